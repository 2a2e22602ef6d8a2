//! Database URLs in messages: every password form sqlx accepts is hidden.
//!
//! A password can sit in the userinfo (`postgres://user:pw@host`) or in a
//! query parameter (`?password=pw`); any parameter whose name contains
//! "password" in any case (`sslpassword`, `Password`) is treated as secret,
//! whether sqlx reads it or not.

/// A database URL with every password replaced by `***`, for logs and errors.
///
/// Errs on the side of hiding: when the URL is malformed so that it is not
/// clear where the userinfo ends, everything up to the last `@` is hidden.
pub fn redact(url: &str) -> String {
    // The query first: a malformed userinfo may swallow part of it below.
    let url = redact_query(url);
    // Without `//` there is no authority, so no userinfo.
    let Some((scheme, rest)) = url.find("://").map(|i| url.split_at(i + 3)) else {
        return url.clone();
    };
    let Some(at) = rest.rfind('@') else {
        return url.clone();
    };
    let (info, location) = rest.split_at(at);
    let userinfo = match info.split_once(':') {
        Some((user, _)) if is_plain_user(user) => format!("{user}:***"),
        None if is_plain_user(info) => info.to_owned(),
        // The `@` belongs to something after the host (a query value, a
        // password with a `/` in it): hide it all rather than guess.
        _ => "***".to_owned(),
    };
    format!("{scheme}{userinfo}{location}")
}

/// Drops the query parameters that look like passwords but that sqlx's
/// PostgreSQL driver does not read (`sslpassword`, `PASSWORD`, …): it
/// ignores them anyway, but it logs each ignored parameter with its value.
/// `password` itself stays, as sqlx uses it.
pub(super) fn without_ignored_secrets(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let (query, fragment) = match query.split_once('#') {
        Some((q, f)) => (q, Some(f)),
        None => (query, None),
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = decoded_name(pair);
            let ignored_secret = name != "password" && is_secret_name(&name);
            if ignored_secret {
                tracing::warn!(parameter = %name, "ignoring unsupported connect parameter");
            }
            !ignored_secret
        })
        .collect();
    let mut out = base.to_owned();
    if !kept.is_empty() {
        out.push('?');
        out.push_str(&kept.join("&"));
    }
    if let Some(f) = fragment {
        out.push('#');
        out.push_str(f);
    }
    out
}

fn is_plain_user(user: &str) -> bool {
    !user.contains(['/', '?', '#', '&', '='])
}

/// `url` with the value of every secret query parameter hidden.
fn redact_query(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_owned();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| {
            if is_secret_name(&decoded_name(pair)) {
                let raw_name = pair.split_once('=').map_or(pair, |(n, _)| n);
                format!("{raw_name}=***")
            } else {
                pair.to_owned()
            }
        })
        .collect();
    format!("{base}?{}", pairs.join("&"))
}

fn is_secret_name(name: &str) -> bool {
    name.to_ascii_lowercase().contains("password")
}

/// A query pair's name as sqlx sees it (form-urlencoded: `+` is a space,
/// `%XX` a byte).
fn decoded_name(pair: &str) -> String {
    let raw = pair.split_once('=').map_or(pair, |(n, _)| n).as_bytes();
    let hex = |b: u8| (b as char).to_digit(16).and_then(|d| u8::try_from(d).ok());
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'+' => out.push(b' '),
            b'%' if i + 1 < raw.len() => {
                match (hex(raw[i + 1]), raw.get(i + 2).copied().and_then(hex)) {
                    (Some(hi), Some(lo)) => {
                        out.push(hi * 16 + lo);
                        i += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::{redact, without_ignored_secrets};

    #[test]
    fn redacts_every_password_form() {
        for (url, shown) in [
            ("postgres://u:secret@h/db", "postgres://u:***@h/db"),
            (
                "postgresql://u:secret@h:5432/db",
                "postgresql://u:***@h:5432/db",
            ),
            ("postgres://u:@h/db", "postgres://u:***@h/db"),
            ("postgres://u:p@ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u:pa/ss@h/db", "postgres://u:***@h/db"),
            ("postgres://u:pa?ss@h/db", "postgres://u:***@h/db"),
            (
                "postgres://h/db?password=secret",
                "postgres://h/db?password=***",
            ),
            (
                "postgres://u@h/db?sslmode=require&password=secret&application_name=x",
                "postgres://u@h/db?sslmode=require&password=***&application_name=x",
            ),
            (
                "postgres://h/db?PASSWORD=secret",
                "postgres://h/db?PASSWORD=***",
            ),
            (
                "postgres://h/db?sslpassword=secret",
                "postgres://h/db?sslpassword=***",
            ),
            (
                "postgres://h/db?ssl_Password=secret",
                "postgres://h/db?ssl_Password=***",
            ),
            (
                "postgres://h/db?pass%77ord=secret",
                "postgres://h/db?pass%77ord=***",
            ),
            (
                "postgres://h/db?pass%57ord=secret",
                "postgres://h/db?pass%57ord=***",
            ),
            ("postgres://h/db?password", "postgres://h/db?password=***"),
            (
                "postgres://h/db?password=secret#frag",
                "postgres://h/db?password=***",
            ),
            (
                "postgres://u:secret@h/db?password=secret2",
                "postgres://u:***@h/db?password=***",
            ),
            // An `@` in a query value: over-hidden, never leaked.
            (
                "postgres://h/db?options=a@b&password=secret",
                "postgres://***@b&password=***",
            ),
            ("sqlite://keygate.db", "sqlite://keygate.db"),
            ("sqlite:keygate.db?mode=rwc", "sqlite:keygate.db?mode=rwc"),
            (
                "sqlite://k.db?password=secret",
                "sqlite://k.db?password=***",
            ),
            ("postgres://u@h/db", "postgres://u@h/db"),
            (
                "mysql://root:secret@localhost/db",
                "mysql://root:***@localhost/db",
            ),
            ("", ""),
            ("sqlite:file@x.db", "sqlite:file@x.db"),
        ] {
            let got = redact(url);
            assert_eq!(got, shown, "{url}");
            assert!(
                !got.contains("secret") && !got.contains("ss@"),
                "{url} -> {got}"
            );
        }
    }

    #[test]
    fn drops_secret_parameters_sqlx_would_log() {
        assert_eq!(
            without_ignored_secrets("postgres://h/db?sslpassword=s&password=p&sslmode=disable"),
            "postgres://h/db?password=p&sslmode=disable"
        );
        assert_eq!(
            without_ignored_secrets("postgres://h/db?Password=s"),
            "postgres://h/db"
        );
        assert_eq!(
            without_ignored_secrets("postgres://u:p@h/db"),
            "postgres://u:p@h/db"
        );
    }
}
