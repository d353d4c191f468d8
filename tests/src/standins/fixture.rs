//! The stand-ins' data: the tenants, and the credentials the Tenant Service answers for them.
//!
//! A fixture is a JSON file of the shape
//! `{"tenants": {"<tenant id>": {"<credential type>": <answer>}}}` where `<answer>` is
//! the exact JSON the Tenant Service returns for `GET /tenants/{id}/credentials/{type}`.
//! Answers are kept as raw JSON text, so the stand-in serves them byte for byte.
//!
//! Genesys answers come in two shapes, both found in the field: flat
//! `{"clientId", "clientSecret", "region"}` and wrapped `{"data": {...}}`. Every
//! `genesys` answer that has all three fields in either shape is also a client of the
//! login stand-in ([`GenesysClient`]); malformed ones stay in the fixture (so tests can
//! exercise the gateway's parsing) but cannot log in.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::regions::genesys_login_host;

/// The fixture compiled into the crate (`tests/fixtures/tenants.json`).
pub const DEFAULT_FIXTURE_JSON: &str = include_str!("../../fixtures/tenants.json");

/// Path of the default fixture file on disk, for passing to the `tokengate-standins` binary.
pub fn default_fixture_path() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/fixtures/tenants.json"
    ))
}

/// Why a fixture could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum FixtureError {
    /// The file could not be read.
    #[error("cannot read fixture {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// The text is not JSON of the shape `{"tenants": {id: {type: answer}}}`.
    #[error("fixture is not JSON of the shape {{\"tenants\": {{id: {{type: answer}}}}}}: {0}")]
    Parse(#[from] serde_json::Error),
    /// Two tenants share a Genesys client id, so the login could not tell them apart.
    #[error("genesys client id '{client_id}' is used by tenants '{first}' and '{second}'")]
    DuplicateClientId {
        /// The shared client id.
        client_id: String,
        /// The first tenant using it.
        first: String,
        /// The second tenant using it.
        second: String,
    },
}

/// A Genesys OAuth client known to the login stand-in, taken from a tenant's `genesys` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenesysClient {
    /// The tenant whose credentials these are.
    pub tenant: String,
    /// OAuth client id (`clientId`).
    pub client_id: String,
    /// OAuth client secret (`clientSecret`).
    pub client_secret: String,
    /// Genesys region (`region`), e.g. `eu-west-1`; may be unknown on purpose.
    pub region: String,
}

impl GenesysClient {
    /// The login host this client must be sent to (`login.<domain>`), `None` for an unknown region.
    pub fn login_host(&self) -> Option<String> {
        genesys_login_host(&self.region)
    }

    /// The `Authorization` header value a correct token request carries:
    /// `Basic base64(clientId:clientSecret)`.
    pub fn basic_authorization(&self) -> String {
        let pair = format!("{}:{}", self.client_id, self.client_secret);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(pair)
        )
    }
}

/// The on-disk shape.
#[derive(Deserialize)]
struct FixtureFile {
    tenants: BTreeMap<String, BTreeMap<String, Box<RawValue>>>,
}

/// Tenants and their Tenant Service answers, plus the Genesys clients derived from them.
#[derive(Debug, Clone)]
pub struct Fixture {
    /// tenant id -> credential type -> raw JSON answer, served verbatim.
    tenants: BTreeMap<String, BTreeMap<String, Box<RawValue>>>,
    /// The well-formed `genesys` answers, which the login stand-in accepts.
    clients: Vec<GenesysClient>,
    /// Where each client is in `clients`, by client id and by tenant: the login looks a
    /// client up on every call, and load tests generate a million of them.
    by_client_id: HashMap<String, usize>,
    by_tenant: HashMap<String, usize>,
}

impl Fixture {
    /// Reads and parses a fixture file.
    pub fn load(path: impl AsRef<Path>) -> Result<Fixture, FixtureError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| FixtureError::Read {
            path: path.to_owned(),
            source,
        })?;
        Fixture::from_json(&text)
    }

    /// Parses fixture JSON text.
    pub fn from_json(text: &str) -> Result<Fixture, FixtureError> {
        let file: FixtureFile = serde_json::from_str(text)?;
        let mut clients: Vec<GenesysClient> = Vec::new();
        for (tenant, answers) in &file.tenants {
            let Some(client) = answers
                .get("genesys")
                .and_then(|raw| genesys_client(tenant, raw))
            else {
                continue;
            };
            if let Some(other) = clients.iter().find(|c| c.client_id == client.client_id) {
                return Err(FixtureError::DuplicateClientId {
                    client_id: client.client_id,
                    first: other.tenant.clone(),
                    second: tenant.clone(),
                });
            }
            clients.push(client);
        }
        let mut fixture = Fixture {
            tenants: file.tenants,
            clients: Vec::new(),
            by_client_id: HashMap::new(),
            by_tenant: HashMap::new(),
        };
        for client in clients {
            fixture.add_client(client);
        }
        Ok(fixture)
    }

    fn add_client(&mut self, client: GenesysClient) {
        let index = self.clients.len();
        self.by_client_id.insert(client.client_id.clone(), index);
        self.by_tenant.insert(client.tenant.clone(), index);
        self.clients.push(client);
    }

    /// The fixture embedded in the crate ([`DEFAULT_FIXTURE_JSON`]).
    ///
    /// # Panics
    /// Never in practice: the embedded text is fixed at compile time and a unit test
    /// checks that it parses.
    pub fn default_fixture() -> Fixture {
        Fixture::from_json(DEFAULT_FIXTURE_JSON)
            .expect("the embedded fixture parses (checked by fixture::tests)")
    }

    /// This fixture plus `count` generated tenants for load tests: `bench-0` to
    /// `bench-<count - 1>` (see [`generated_tenant_id`]), each with a flat `genesys`
    /// answer `{"clientId": "bench-<n>-client", "clientSecret": "bench-<n>-secret",
    /// "region": "eu-west-1"}` that the login stand-in accepts like any fixture client.
    ///
    /// A tenant id the fixture already has keeps its own answers. Fails if a generated
    /// client id is already a fixture client's.
    pub fn with_generated_tenants(mut self, count: usize) -> Result<Fixture, FixtureError> {
        for n in 0..count {
            let tenant = generated_tenant_id(n);
            if self.tenants.contains_key(&tenant) {
                continue;
            }
            let client = GenesysClient {
                tenant: tenant.clone(),
                client_id: format!("{tenant}-client"),
                client_secret: format!("{tenant}-secret"),
                region: GENERATED_TENANT_REGION.to_owned(),
            };
            if let Some(first) = self.genesys_client_by_id(&client.client_id) {
                return Err(FixtureError::DuplicateClientId {
                    client_id: client.client_id,
                    first: first.tenant.clone(),
                    second: tenant,
                });
            }
            let answer = serde_json::json!({
                "clientId": client.client_id,
                "clientSecret": client.client_secret,
                "region": client.region,
            });
            let raw = RawValue::from_string(answer.to_string())?;
            self.tenants.insert(
                tenant.clone(),
                BTreeMap::from([("genesys".to_owned(), raw)]),
            );
            self.add_client(client);
        }
        Ok(self)
    }

    /// This fixture with `tenant`'s answer for `credential_type` set to `answer` (e.g.
    /// credentials of an `oauth2` provider a test configures). Not for `genesys`,
    /// whose answers are also the login's clients.
    pub fn with_answer(
        mut self,
        tenant: &str,
        credential_type: &str,
        answer: &serde_json::Value,
    ) -> Fixture {
        assert_ne!(
            credential_type, "genesys",
            "Genesys clients come from the file"
        );
        let raw = RawValue::from_string(answer.to_string())
            .unwrap_or_else(|e| panic!("a JSON value is raw JSON: {e}"));
        self.tenants
            .entry(tenant.to_owned())
            .or_default()
            .insert(credential_type.to_owned(), raw);
        self
    }

    /// The Tenant Service's answer for a tenant and credential type, as raw JSON text.
    pub fn credentials(&self, tenant: &str, credential_type: &str) -> Option<&str> {
        self.tenants
            .get(tenant)?
            .get(credential_type)
            .map(|raw| raw.get())
    }

    /// Whether the tenant exists at all.
    pub fn has_tenant(&self, tenant: &str) -> bool {
        self.tenants.contains_key(tenant)
    }

    /// All tenant ids, sorted.
    pub fn tenant_ids(&self) -> impl Iterator<Item = &str> {
        self.tenants.keys().map(String::as_str)
    }

    /// All Genesys clients the login accepts, sorted by tenant.
    pub fn genesys_clients(&self) -> &[GenesysClient] {
        &self.clients
    }

    /// The Genesys client of a tenant.
    pub fn genesys_client(&self, tenant: &str) -> Option<&GenesysClient> {
        self.clients.get(*self.by_tenant.get(tenant)?)
    }

    /// The Genesys client with this client id.
    pub fn genesys_client_by_id(&self, client_id: &str) -> Option<&GenesysClient> {
        self.clients.get(*self.by_client_id.get(client_id)?)
    }

    /// Every secret the fixture holds, each with a label that names it without showing
    /// it: the Genesys client secrets and their `Basic` headers (which must never leave
    /// the gateway), and the WhatsApp tokens (which only the upstream may see).
    pub fn secrets(&self) -> Vec<LabelledSecret> {
        let mut secrets = Vec::new();
        for client in &self.clients {
            secrets.push(LabelledSecret::credential(
                format!("client secret of {}", client.tenant),
                &client.client_secret,
            ));
            let basic = client.basic_authorization();
            let encoded = basic.trim_start_matches("Basic ");
            secrets.push(LabelledSecret::credential(
                format!("Basic credentials of {}", client.tenant),
                encoded,
            ));
        }
        for (tenant, answers) in &self.tenants {
            // Client secrets of other providers' answers (an `oauth2` provider's).
            for (credential_type, raw) in answers {
                let value = serde_json::from_str::<serde_json::Value>(raw.get());
                let secret = value.ok().and_then(|value| {
                    let fields = value.get("data").unwrap_or(&value);
                    fields.get("clientSecret")?.as_str().map(str::to_owned)
                });
                if let Some(secret) = secret.filter(|_| credential_type != "genesys") {
                    secrets.push(LabelledSecret::credential(
                        format!("{credential_type} client secret of {tenant}"),
                        &secret,
                    ));
                }
            }
            let Some(raw) = answers.get("whatsapp") else {
                continue;
            };
            let Ok(value) = serde_json::from_str::<serde_json::Value>(raw.get()) else {
                continue;
            };
            let fields = value.get("data").unwrap_or(&value);
            for field in WHATSAPP_TOKEN_FIELDS {
                if let Some(token) = fields.get(field).and_then(serde_json::Value::as_str) {
                    secrets.push(LabelledSecret::token(
                        format!("WhatsApp token of {tenant}"),
                        token,
                    ));
                }
            }
        }
        secrets
    }

    /// The tenant named by `tenant_or_client`: a tenant id, or a Genesys client id.
    pub fn resolve_tenant<'a>(&'a self, tenant_or_client: &'a str) -> Option<&'a str> {
        if self.has_tenant(tenant_or_client) {
            return Some(tenant_or_client);
        }
        self.genesys_client_by_id(tenant_or_client)
            .map(|c| c.tenant.as_str())
    }
}

/// The fields a WhatsApp answer may carry its token in (FACTS §5).
const WHATSAPP_TOKEN_FIELDS: [&str; 3] = ["systemUserToken", "accessToken", "token"];

/// Whether a secret may be shown to anyone at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// A client credential: only the gateway and the login may ever see it.
    Credential,
    /// An access token: the upstream app (and endpoint mode's caller) may see it, no
    /// log and no error answer may.
    Token,
}

/// A secret with a label that names it without showing it ("client secret of acme").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelledSecret {
    /// What the secret is and whose.
    pub label: String,
    /// The secret itself.
    pub value: String,
    /// Who may see it.
    pub kind: SecretKind,
}

impl LabelledSecret {
    /// A client credential.
    pub fn credential(label: String, value: &str) -> LabelledSecret {
        LabelledSecret {
            label,
            value: value.to_owned(),
            kind: SecretKind::Credential,
        }
    }

    /// An access token.
    pub fn token(label: String, value: &str) -> LabelledSecret {
        LabelledSecret {
            label,
            value: value.to_owned(),
            kind: SecretKind::Token,
        }
    }
}

/// Prefix of the tenants [`Fixture::with_generated_tenants`] adds.
pub const GENERATED_TENANT_PREFIX: &str = "bench-";

/// Region of the generated tenants (login host `login.mypurecloud.ie`).
pub const GENERATED_TENANT_REGION: &str = "eu-west-1";

/// The id of generated tenant `n`: `bench-<n>`.
pub fn generated_tenant_id(n: usize) -> String {
    format!("{GENERATED_TENANT_PREFIX}{n}")
}

/// Reads a `genesys` answer in either the flat or the `{"data": {...}}` shape.
fn genesys_client(tenant: &str, raw: &RawValue) -> Option<GenesysClient> {
    let value: serde_json::Value = serde_json::from_str(raw.get()).ok()?;
    let fields = match value.get("data") {
        Some(data) if data.is_object() => data,
        _ => &value,
    };
    let text = |name: &str| fields.get(name)?.as_str().map(str::to_owned);
    Some(GenesysClient {
        tenant: tenant.to_owned(),
        client_id: text("clientId")?,
        client_secret: text("clientSecret")?,
        region: text("region")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_fixture_parses_and_has_the_documented_tenants() {
        let fixture = Fixture::default_fixture();
        let ids: Vec<_> = fixture.tenant_ids().collect();
        for expected in [
            "acme", "globex", "initech", "umbrella", "hooli", "wayne", "wonka", "lostco", "tyrell",
        ] {
            assert!(ids.contains(&expected), "{expected} missing from {ids:?}");
        }
    }

    #[test]
    fn flat_and_data_wrapped_genesys_answers_are_both_clients() {
        let fixture = Fixture::default_fixture();
        let acme = fixture.genesys_client("acme").expect("acme");
        assert_eq!(acme.client_id, "acme-client");
        assert_eq!(acme.client_secret, "acme-secret-7f3a9c");
        assert_eq!(acme.login_host().as_deref(), Some("login.mypurecloud.ie"));
        let globex = fixture.genesys_client("globex").expect("globex");
        assert_eq!(globex.client_id, "globex-client");
        assert_eq!(
            globex.login_host().as_deref(),
            Some("login.aps1.pure.cloud")
        );
    }

    #[test]
    fn malformed_or_absent_genesys_answers_are_not_clients() {
        let fixture = Fixture::default_fixture();
        assert!(fixture.credentials("tyrell", "genesys").is_some());
        assert!(fixture.genesys_client("tyrell").is_none());
        assert!(fixture.genesys_client("wonka").is_none());
        assert_eq!(
            fixture.genesys_client("lostco").map(|c| c.login_host()),
            Some(None)
        );
    }

    #[test]
    fn answers_are_kept_verbatim() {
        let fixture = Fixture::default_fixture();
        assert_eq!(
            fixture.credentials("acme", "whatsapp"),
            Some(r#"{"systemUserToken": "wa-acme-token-51d2", "expiresAt": null}"#)
        );
        assert_eq!(fixture.credentials("acme", "nope"), None);
        assert_eq!(fixture.credentials("nobody", "genesys"), None);
    }

    #[test]
    fn resolve_tenant_accepts_tenant_or_client_id() {
        let fixture = Fixture::default_fixture();
        assert_eq!(fixture.resolve_tenant("acme"), Some("acme"));
        assert_eq!(fixture.resolve_tenant("globex-client"), Some("globex"));
        assert_eq!(fixture.resolve_tenant("nobody"), None);
    }

    #[test]
    fn load_reads_a_file_and_reports_errors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.json");
        std::fs::write(
            &path,
            r#"{"tenants": {"a": {"genesys": {"clientId": "c", "clientSecret": "s", "region": "us-east-1"}}}}"#,
        )
        .expect("write");
        let fixture = Fixture::load(&path).expect("loads");
        assert_eq!(fixture.genesys_clients().len(), 1);

        let missing = Fixture::load(dir.path().join("missing.json"));
        assert!(matches!(missing, Err(FixtureError::Read { .. })));
        assert!(matches!(
            Fixture::from_json(r#"{"tenant": {}}"#),
            Err(FixtureError::Parse(_))
        ));
    }

    #[test]
    fn duplicate_client_ids_are_rejected() {
        let text = r#"{"tenants": {
            "a": {"genesys": {"clientId": "same", "clientSecret": "s1", "region": "us-east-1"}},
            "b": {"genesys": {"data": {"clientId": "same", "clientSecret": "s2", "region": "eu-west-1"}}}
        }}"#;
        assert!(matches!(
            Fixture::from_json(text),
            Err(FixtureError::DuplicateClientId { .. })
        ));
    }

    #[test]
    fn generated_tenants_are_explicit_and_log_in_like_fixture_tenants() {
        let fixture = Fixture::default_fixture()
            .with_generated_tenants(3)
            .expect("generated");
        let ids: Vec<_> = fixture
            .tenant_ids()
            .filter(|id| id.starts_with("bench-"))
            .collect();
        assert_eq!(ids, ["bench-0", "bench-1", "bench-2"]);
        assert!(!fixture.has_tenant("bench-3"), "only the requested count");
        assert_eq!(generated_tenant_id(2), "bench-2");
        let answer: serde_json::Value =
            serde_json::from_str(fixture.credentials("bench-1", "genesys").expect("answer"))
                .expect("json");
        assert_eq!(
            answer,
            serde_json::json!({"clientId": "bench-1-client", "clientSecret": "bench-1-secret", "region": "eu-west-1"})
        );
        let client = fixture
            .genesys_client_by_id("bench-1-client")
            .expect("client");
        assert_eq!(client.tenant, "bench-1");
        assert_eq!(client.login_host().as_deref(), Some("login.mypurecloud.ie"));
        assert_eq!(fixture.resolve_tenant("bench-2-client"), Some("bench-2"));
        // The fixture's own tenants are untouched.
        assert_eq!(
            fixture.genesys_client("acme"),
            Fixture::default_fixture().genesys_client("acme")
        );
        assert_eq!(fixture.credentials("bench-0", "whatsapp"), None);
    }

    #[test]
    fn generated_tenants_keep_existing_tenants_and_refuse_clashing_client_ids() {
        let text = r#"{"tenants": {
            "bench-0": {"genesys": {"clientId": "own", "clientSecret": "s", "region": "us-east-1"}},
            "x": {"genesys": {"clientId": "bench-1-client", "clientSecret": "s", "region": "us-east-1"}}
        }}"#;
        let kept = Fixture::from_json(text)
            .expect("parses")
            .with_generated_tenants(1)
            .expect("bench-0 exists already and is kept");
        assert_eq!(
            kept.genesys_client("bench-0").map(|c| c.client_id.as_str()),
            Some("own")
        );
        assert!(matches!(
            Fixture::from_json(text)
                .expect("parses")
                .with_generated_tenants(2),
            Err(FixtureError::DuplicateClientId { .. })
        ));
    }

    #[test]
    fn basic_authorization_encodes_id_and_secret() {
        let fixture = Fixture::default_fixture();
        let initech = fixture.genesys_client("initech").expect("initech");
        // base64("initech-client:initech-secret-9d1e")
        assert_eq!(
            initech.basic_authorization(),
            "Basic aW5pdGVjaC1jbGllbnQ6aW5pdGVjaC1zZWNyZXQtOWQxZQ=="
        );
    }
}
