//! Keys written straight into `api_keys` with SQL (PostgreSQL COPY, SQLite
//! multi-row INSERTs), not through a million CreateKey calls. The rows are
//! what keygate itself writes for an active ORGANIZATION key: the token's
//! prefix and the SHA-256 of its secret, from `keygate_core::token`.

use std::time::{Duration, Instant};

use keygate_core::key::Mode;
use keygate_core::token::{Brand, generate};
use sqlx::Connection;

use crate::server::Database;

/// The `api_keys` columns a bulk row fills; the rest take their defaults or NULL.
const COLUMNS: &str = "id, name, organization_id, tier, mode, prefix, secret_digest, scopes, \
                       allowed_cidrs, rate_limit_per_minute, status, created_at, created_by, \
                       version, previous_secret_announced, previous_secret_uses";

/// Keys loaded: their tokens (a sample, see [`load`]) and how long it took.
pub struct Loaded {
    /// `(key id, token)` of the kept keys.
    pub keys: Vec<(String, String)>,
    pub took: Duration,
}

struct Row {
    id: String,
    org: String,
    prefix: String,
    digest: [u8; 32],
    created_at: i64,
}

fn rows(
    count: usize,
    keep: usize,
    mut each: impl FnMut(Row),
) -> Result<Vec<(String, String)>, String> {
    let brand = Brand::default();
    let stride = (count / keep.max(1)).max(1);
    let mut kept = Vec::with_capacity(keep.min(count));
    let base = chrono::Utc::now().timestamp_micros() - count as i64;
    for i in 0..count {
        let id = uuid::Uuid::new_v4();
        let token = generate(&brand, Mode::Live, id).map_err(|e| format!("token: {e}"))?;
        if i % stride == 0 && kept.len() < keep {
            kept.push((id.to_string(), token.token));
        }
        each(Row {
            id: id.to_string(),
            org: format!("org_b{}", i % 1000),
            prefix: token.prefix,
            digest: token.digest.0,
            created_at: base + i as i64,
        });
    }
    Ok(kept)
}

/// Writes `count` active keys (scopes `checkout:create checkout:read`, the
/// highest rate limit, 1,000 organizations) into `db`, whose migrations must
/// have run; keeps the tokens of `keep` of them, spread over the load.
pub async fn load(db: &Database, count: usize, keep: usize) -> Result<Loaded, String> {
    let started = Instant::now();
    let keys = if db.is_postgres() {
        load_postgres(&db.url, count, keep).await?
    } else {
        load_sqlite(&db.url, count, keep).await?
    };
    Ok(Loaded {
        keys,
        took: started.elapsed(),
    })
}

const SCOPES: &str = "checkout:create checkout:read";
const RATE: u32 = keygate_core::bounds::MAX_RATE_LIMIT;

async fn load_postgres(
    url: &str,
    count: usize,
    keep: usize,
) -> Result<Vec<(String, String)>, String> {
    use std::fmt::Write as _;
    let mut conn = sqlx::PgConnection::connect(url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut copy = conn
        .copy_in_raw(&format!("COPY api_keys ({COLUMNS}) FROM STDIN"))
        .await
        .map_err(|e| format!("COPY: {e}"))?;
    let mut buf = String::with_capacity(1 << 20);
    let mut chunks = Vec::new();
    let kept = rows(count, keep, |r| {
        let mut hex = String::with_capacity(64);
        for b in r.digest {
            let _ = write!(hex, "{b:02x}");
        }
        // COPY's text format: tab-separated, `\\x…` is bytea's hex form.
        let _ = writeln!(
            buf,
            "{}\tbulk\t{}\torganization\tlive\t{}\t\\\\x{hex}\t{SCOPES}\t\t{RATE}\tactive\t{}\tbootstrap\t1\t0\t0",
            r.id, r.org, r.prefix, r.created_at
        );
        if buf.len() > (1 << 20) {
            chunks.push(std::mem::take(&mut buf));
        }
    })?;
    chunks.push(buf);
    for chunk in chunks {
        copy.send(chunk.as_bytes())
            .await
            .map_err(|e| format!("COPY: {e}"))?;
    }
    copy.finish().await.map_err(|e| format!("COPY: {e}"))?;
    sqlx::query("ANALYZE api_keys")
        .execute(&mut conn)
        .await
        .map_err(|e| format!("ANALYZE: {e}"))?;
    Ok(kept)
}

async fn load_sqlite(
    url: &str,
    count: usize,
    keep: usize,
) -> Result<Vec<(String, String)>, String> {
    let mut all = Vec::with_capacity(count);
    let kept = rows(count, keep, |r| all.push(r))?;
    let mut conn = sqlx::SqliteConnection::connect(url)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let mut tx = conn.begin().await.map_err(|e| e.to_string())?;
    // 16 parameters a row, under SQLite's 32,766.
    for batch in all.chunks(1000) {
        let mut q =
            sqlx::QueryBuilder::<sqlx::Sqlite>::new(format!("INSERT INTO api_keys ({COLUMNS}) "));
        q.push_values(batch, |mut b, r| {
            b.push_bind(&r.id)
                .push_bind("bulk")
                .push_bind(&r.org)
                .push_bind("organization")
                .push_bind("live")
                .push_bind(&r.prefix)
                .push_bind(&r.digest[..])
                .push_bind(SCOPES)
                .push_bind("")
                .push_bind(i64::from(RATE))
                .push_bind("active")
                .push_bind(r.created_at)
                .push_bind("bootstrap")
                .push_bind(1i64)
                .push_bind(0i64)
                .push_bind(0i64);
        });
        q.build()
            .execute(&mut *tx)
            .await
            .map_err(|e| format!("INSERT: {e}"))?;
    }
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(kept)
}
