//! Secrets and redaction: [`Secret`], which keeps a passcode out of `Debug` output, and
//! [`redact_credentials`], which takes the password out of every URL in a text.

use std::fmt;

use super::OutboxConfig;

/// A secret setting (a passcode): kept out of `Debug` output and logs.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

impl OutboxConfig {
    /// `broker_url` as it may be shown: comma-separated, every password replaced by `***`.
    pub fn broker_urls_redacted(&self) -> String {
        self.broker_url
            .iter()
            .map(|url| redact_credentials(url.expose()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The value of `name` as an error may show it: never a passcode, and a URL without its
/// credentials (an `OUTBOX_DATABASE_URL`, which is not a setting, would otherwise be printed
/// whole).
pub(super) fn shown_value(name: &str, raw: &str) -> String {
    let upper = name.to_ascii_uppercase();
    if ["PASSCODE", "PASSWORD", "SECRET", "TOKEN"]
        .iter()
        .any(|word| upper.contains(word))
    {
        "***".into()
    } else {
        redact_credentials(raw)
    }
}

/// `text` with the credentials of every URL in it replaced by `***`: the password of
/// `scheme://user:password@host` (the user name is kept), whatever the scheme, and whether or not
/// the URL parses: a password holding `#`, `?`, `/` or `@` unencoded, as copied from a setting,
/// is cut at the last `@` of the address. The values of query parameters that carry a secret
/// (`?password=`, `&sslpassword=`, `pass=`, `passwd=`, `pwd=`, any name with `pass`, `pwd`,
/// `secret` or `token` in it) go too. Errors of database drivers quote the URL they were
/// given; every output that may carry one goes through this (the command line's errors and
/// logs, the library's logs of database errors, [`crate::Error::Database`], the consumer's
/// failure reports, the values of refused settings).
///
/// ```
/// assert_eq!(
///     outbox::config::redact_credentials("cannot parse postgresql+psycopg://app:Dj4ngo!@db:5432/app"),
///     "cannot parse postgresql+psycopg://app:***@db:5432/app",
/// );
/// assert_eq!(
///     outbox::config::redact_credentials("postgres://app@db/app?sslmode=require&password=Dj4ngo!"),
///     "postgres://app@db/app?sslmode=require&password=***",
/// );
/// ```
pub fn redact_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (before, after) = rest.split_at(at + 3);
        out.push_str(before);
        // The address runs to the next blank or quote: a password may hold anything else.
        let end = after
            .find(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '`' | '<' | '>'))
            .unwrap_or(after.len());
        let address = &after[..end];
        let host_and_rest = match address.rfind('@') {
            Some(last_at) => {
                let userinfo = &address[..last_at];
                match userinfo.find(':') {
                    Some(colon) => {
                        out.push_str(&userinfo[..colon]);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                &address[last_at..]
            }
            None => address,
        };
        match host_and_rest.split_once('?') {
            Some((path, query)) => {
                out.push_str(path);
                out.push('?');
                out.push_str(&redact_query(query));
            }
            None => out.push_str(host_and_rest),
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

/// The secrets a URL carries, as written: the password of its user info (`user:password@`, cut
/// at the last `@` of the address, so that a password holding `#`, `?`, `/` or `@` unencoded is
/// whole), and the value of every query parameter that names a secret (see
/// [`redact_credentials`]). For an output that must blank them wherever they appear, not only
/// inside the URL (the `outbox` command does).
///
/// ```
/// assert_eq!(
///     outbox::config::url_secrets("postgres://app:Dj4ngo!@db/app?sslmode=require&sslpassword=K3y"),
///     ["Dj4ngo!", "K3y"],
/// );
/// ```
pub fn url_secrets(url: &str) -> Vec<String> {
    let Some((_, rest)) = url.split_once("://") else {
        return Vec::new();
    };
    let address = rest.split(char::is_whitespace).next().unwrap_or_default();
    let mut secrets = Vec::new();
    let after_userinfo = match address.rfind('@') {
        Some(last_at) => {
            if let Some((_, password)) = address[..last_at].split_once(':')
                && !password.is_empty()
            {
                secrets.push(password.to_owned());
            }
            &address[last_at..]
        }
        None => address,
    };
    if let Some((_, query)) = after_userinfo.split_once('?') {
        for pair in query.split('&') {
            if let Some((name, value)) = pair.split_once('=')
                && names_a_secret(name)
                && !value.is_empty()
            {
                secrets.push(value.to_owned());
            }
        }
    }
    secrets
}

/// A URL's query with the value of every parameter that names a secret replaced by `***`.
fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if names_a_secret(name) => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Whether a query parameter's name says its value is a secret (`password`, `sslpassword`,
/// `pass`, `passwd`, `pwd`, `client_secret`, `auth_token`, ...).
fn names_a_secret(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    ["pass", "pwd", "secret", "token"]
        .iter()
        .any(|word| name.contains(word))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_redacted_from_any_url_even_malformed() {
        for (text, shown) in [
            (
                "cannot connect: postgres://postgres:Qx7#pw?z@127.0.0.1:5432/test failed",
                "cannot connect: postgres://postgres:***@127.0.0.1:5432/test failed",
            ),
            (
                "postgresql+psycopg://app:Dj4ngo!@db.internal:5432/app",
                "postgresql+psycopg://app:***@db.internal:5432/app",
            ),
            (
                "url \"mysql://root:p%40ss%25w0rd%23@h/db\" refused",
                "url \"mysql://root:***@h/db\" refused",
            ),
            (
                "amqps://u:a@b@c/d@host:5671/vh",
                "amqps://u:***@host:5671/vh",
            ),
            (
                "two: a://x:1@h and b://y:2@k",
                "two: a://x:***@h and b://y:***@k",
            ),
            (
                "no password: postgres://postgres@127.0.0.1/test",
                "no password: postgres://postgres@127.0.0.1/test",
            ),
            ("nothing here", "nothing here"),
            ("sqlite://db.sqlite?mode=rwc", "sqlite://db.sqlite?mode=rwc"),
            (
                "postgres://postgres@127.0.0.1:1/test?password=Qx7pw failed",
                "postgres://postgres@127.0.0.1:1/test?password=*** failed",
            ),
            (
                "postgres://u:Qx7@h/db?sslmode=require&sslpassword=Qx7&application_name=x",
                "postgres://u:***@h/db?sslmode=require&sslpassword=***&application_name=x",
            ),
            (
                "mysql://h/db?user=root&PASS=Qx7&pwd=Qx7&passwd=Qx7",
                "mysql://h/db?user=root&PASS=***&pwd=***&passwd=***",
            ),
            (
                "'amqp://h/?auth_token=Qx7&client_secret=Qx7'",
                "'amqp://h/?auth_token=***&client_secret=***'",
            ),
            // A password with an unencoded `?`: cut at the last `@`, the query after it.
            (
                "postgres://u:Qx7?pw@h/db?password=Qx7",
                "postgres://u:***@h/db?password=***",
            ),
        ] {
            assert_eq!(redact_credentials(text), shown);
        }
    }
}
