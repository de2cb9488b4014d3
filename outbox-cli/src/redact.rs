//! Keeping this run's secrets out of every error and log line it prints.

use std::io::Write;
use std::sync::Arc;

use outbox::config::url_secrets;

/// Takes the secrets of this run out of every error and log line: the credentials of any URL
/// ([`outbox::config::redact_credentials`]), and, wherever they appear, the database password
/// (of the URL's user info, or a `?password=`-like parameter: [`url_secrets`]) and the broker
/// passcode this run was given, as written, percent-decoded and percent-encoded (a driver may
/// quote any of these, and an unparsable URL is quoted whole).
pub(crate) struct Redactor {
    secrets: Vec<String>,
}

/// Shorter secrets are not searched for in the text (they would blank out ordinary words);
/// the URL redaction still covers them.
const SHORTEST_SECRET: usize = 4;

impl Redactor {
    /// The redactor of a run given `database_url` and the `OUTBOX_*` settings.
    pub(crate) fn new(database_url: Option<&str>) -> Redactor {
        let mut secrets = database_url.map(url_secrets).unwrap_or_default();
        if let Ok(passcode) = std::env::var("OUTBOX_STOMP_PASSCODE") {
            let username =
                std::env::var("OUTBOX_STOMP_USERNAME").unwrap_or_else(|_| "guest".into());
            // The default guest/guest: the passcode is the user name, which is no secret.
            if passcode != username {
                secrets.push(passcode);
            }
        }
        let mut forms = Vec::new();
        for secret in secrets {
            forms.push(percent_decoded(&secret));
            forms.push(percent_encoded(&secret, true));
            forms.push(percent_encoded(&secret, false));
            forms.push(secret);
        }
        forms.retain(|form| form.chars().count() >= SHORTEST_SECRET);
        // Longest first: a form that contains another is replaced whole.
        forms.sort_by_key(|form| std::cmp::Reverse(form.len()));
        forms.dedup();
        Redactor { secrets: forms }
    }

    /// `text` without the run's secrets.
    pub(crate) fn redact(&self, text: &str) -> String {
        let mut text = text.to_owned();
        for secret in &self.secrets {
            if text.contains(secret.as_str()) {
                text = text.replace(secret.as_str(), "***");
            }
        }
        outbox::config::redact_credentials(&text)
    }
}

/// `%XX` sequences decoded, the rest kept as it is.
fn percent_decoded(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(high), Some(low)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((high * 16 + low) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every byte but RFC 3986's unreserved characters as `%XX`, in upper or lower case hex.
fn percent_encoded(text: &str, upper: bool) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else if upper {
            out.push_str(&format!("%{byte:02X}"));
        } else {
            out.push_str(&format!("%{byte:02x}"));
        }
    }
    out
}

/// Standard error through a [`Redactor`]: the log formatter writes each event in one piece.
pub(crate) struct RedactingStderr(pub(crate) Arc<Redactor>);

impl Write for RedactingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        std::io::stderr().write_all(self.0.redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_s_secrets_are_redacted_in_every_form() {
        let url = "postgres://app:Qx7#pw?z@%41@127.0.0.1:5432/test";
        assert_eq!(url_secrets(url), ["Qx7#pw?z@%41"]);
        assert!(url_secrets("postgres://app@h/db").is_empty());
        assert!(url_secrets("not a url").is_empty());
        let redactor = Redactor::new(Some(url));
        for leak in [
            "Qx7#pw?z@%41",
            "Qx7#pw?z@A",
            "Qx7%23pw%3Fz%40%2541",
            "qx7: Qx7%23pw%3fz%40%2541",
        ] {
            let shown = redactor.redact(&format!("error near {leak} end"));
            assert!(!shown.contains("pw"), "{leak}: {shown}");
        }
        assert_eq!(
            redactor.redact("invalid URL postgresql+psycopg://u:Dj4ngo!@h/db"),
            "invalid URL postgresql+psycopg://u:***@h/db"
        );
        // A password given as a query parameter, quoted alone by a driver.
        let redactor = Redactor::new(Some("postgres://app@h/db?password=Qx7%23pw&sslmode=prefer"));
        for leak in ["Qx7%23pw", "Qx7#pw"] {
            let shown = redactor.redact(&format!("password {leak} refused"));
            assert!(!shown.contains("pw"), "{leak}: {shown}");
        }
    }
}
