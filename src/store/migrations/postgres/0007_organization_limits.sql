-- Rate limits shared by every key of an organization (SetOrganizationLimits;
-- times are unix microseconds). A cleared limit stays as 0, so updated_at and
-- updated_by still say who cleared it and when.
CREATE TABLE organization_limits (
    organization_id       TEXT PRIMARY KEY,
    rate_limit_per_minute BIGINT NOT NULL,
    updated_at            BIGINT NOT NULL,
    updated_by            TEXT NOT NULL
);
