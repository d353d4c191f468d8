//! Secret hygiene, checked by every end-to-end test.
//!
//! When a [`Stack`](crate::harness::Stack) or [`Cluster`](crate::harness::Cluster) is
//! dropped after a passing test, its [`LeakScan`] searches every log its processes wrote
//! (Envoy at `debug`, the companion at `trace`, Redis; see
//! [`crate::harness::log_like_an_operator`]) and every response body the tests of this
//! binary read through [`receive`], for every secret the stand-ins know or issued
//! ([`Secrets`]). A hit fails the test with the file, the line and the kind of secret,
//! never the secret itself.
//!
//! What counts as a leak:
//! - a client credential (a client secret, or its `Basic` encoding) anywhere;
//! - an access token (issued by the login, or a WhatsApp token of the fixture) in any
//!   log line, or in the body of an error answer (status 400 and above) that the
//!   gateway made. Tokens in successful bodies are the product working (endpoint mode
//!   answers with tokens), and the echo upstream's report of the headers it received
//!   holds the `Authorization` header the gateway added, whatever its status.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use crate::standins::{LabelledSecret, SecretKind, Secrets};

/// Every response body read through [`receive`] in this test binary.
static SEEN_BODIES: Mutex<Vec<SeenBody>> = Mutex::new(Vec::new());

/// One response body a test read.
#[derive(Debug)]
struct SeenBody {
    status: u16,
    text: String,
}

/// A response as the test client saw it; its body is kept for the leak scan.
#[derive(Debug)]
pub struct Received {
    /// The status.
    pub status: u16,
    /// The headers.
    pub headers: reqwest::header::HeaderMap,
    /// The body, as text (invalid UTF-8 replaced).
    pub text: String,
}

impl Received {
    /// The body as JSON; `Null` when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.text).unwrap_or_default()
    }
}

/// Reads a whole response and records its body for the leak scan.
pub async fn receive(response: reqwest::Response) -> Received {
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let bytes = response.bytes().await.unwrap_or_default();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    record_body(status, &text);
    Received {
        status,
        headers,
        text,
    }
}

/// Records a body read some other way (a raw socket, say) for the leak scan.
pub fn record_body(status: u16, text: &str) {
    SEEN_BODIES
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(SeenBody {
            status,
            text: text.to_owned(),
        });
}

/// Searches the logs in a folder and the bodies seen for leaked secrets when dropped
/// (declare it after the processes, so that they have stopped and written everything).
#[derive(Debug)]
pub struct LeakScan {
    logs: PathBuf,
    secrets: Secrets,
}

impl LeakScan {
    /// A scan of the `*.log` files in `logs` for `secrets`.
    pub fn new(logs: &Path, secrets: Secrets) -> LeakScan {
        LeakScan {
            logs: logs.to_path_buf(),
            secrets,
        }
    }

    /// Every leak found now, one line each: where, and what leaked (by its label).
    pub fn leaks(&self) -> Vec<String> {
        let secrets = self.secrets.all();
        let mut leaks = self.leaks_in_logs(&secrets);
        let bodies = SEEN_BODIES.lock().unwrap_or_else(PoisonError::into_inner);
        for body in bodies.iter() {
            for secret in &secrets {
                let forbidden = secret.kind == SecretKind::Credential
                    || (body.status >= 400 && !is_echo_report(&body.text));
                if forbidden && body.text.contains(&secret.value) {
                    leaks.push(format!(
                        "a {} answer's body holds the {}",
                        body.status, secret.label
                    ));
                }
            }
        }
        leaks
    }

    fn leaks_in_logs(&self, secrets: &[LabelledSecret]) -> Vec<String> {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.logs)
            .map(|entries| {
                entries
                    .filter_map(|entry| entry.ok().map(|entry| entry.path()))
                    .filter(|path| path.extension().is_some_and(|ext| ext == "log"))
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        let mut leaks = Vec::new();
        for log in logs {
            let text =
                String::from_utf8_lossy(&std::fs::read(&log).unwrap_or_default()).into_owned();
            let name = log.file_name().unwrap_or_default().to_string_lossy();
            for secret in secrets {
                for (at, _) in text.match_indices(&secret.value) {
                    let line = text[..at].matches('\n').count() + 1;
                    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
                    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
                    let shown = text[start..end].replace(&secret.value, "<secret>");
                    let shown: String = shown.chars().take(300).collect();
                    leaks.push(format!("{name}:{line}: the {}: {shown}", secret.label));
                }
            }
        }
        leaks
    }
}

/// Whether a body is the echo upstream's report of the request it received (see
/// `standins::echo`) rather than an answer of the gateway.
fn is_echo_report(text: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(text).is_ok_and(|body| {
        body.get("method").is_some() && body.get("path").is_some() && body["headers"].is_object()
    })
}

impl Drop for LeakScan {
    fn drop(&mut self) {
        if std::thread::panicking() {
            return;
        }
        let leaks = self.leaks();
        assert!(
            leaks.is_empty(),
            "{} secret(s) leaked into logs or answers:\n{}",
            leaks.len(),
            leaks.join("\n")
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::standins::{Fixture, StandIns};

    #[tokio::test]
    async fn the_scan_finds_planted_secrets_and_tokens_and_spares_the_echo_report() {
        let standins = StandIns::start(Fixture::default_fixture())
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let scan = LeakScan::new(dir.path(), standins.secrets());
        let log = dir.path().join("envoy-1.log");
        std::fs::write(
            &log,
            "a clean line\nclient_secret=acme-secret-7f3a9c sent\n",
        )
        .unwrap_or_else(|e| panic!("{e}"));
        record_body(502, r#"{"code":"X","message":"wa-hooli-token-6f19"}"#);
        record_body(200, r#"{"accessToken":"wa-hooli-token-6f19"}"#);
        record_body(
            401,
            r#"{"method":"GET","path":"/","headers":{"authorization":"Bearer wa-hooli-token-6f19"}}"#,
        );

        let leaks = scan.leaks();

        assert_eq!(
            leaks,
            [
                "envoy-1.log:2: the client secret of acme: client_secret=<secret> sent",
                "a 502 answer's body holds the WhatsApp token of hooli",
            ],
            "the log hit names file, line and secret; only the gateway's error body counts"
        );
        // Clean up what was planted, so that the scan passes when dropped.
        std::fs::remove_file(&log).unwrap_or_else(|e| panic!("{e}"));
        SEEN_BODIES
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        assert!(scan.leaks().is_empty());
    }
}
