//! The seed's acceptance bullets for credential fetching and the OAuth exchange, run
//! against the sans-IO flow with a fake clock and scripted answers.

use std::collections::{BTreeMap, VecDeque};

#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

use tokengate_core::providers::{ProviderDocument, ProviderTable};
use tokengate_core::{
    CalloutResult, Destination, ErrorCode, FetchConfig, FetchFlow, FetchedToken, Provider,
    SecretBytes, Step, TenantId, TokenError, TokenKey,
};

const START_MS: u64 = 1_800_000_000_000;
const GENESYS_CREDENTIALS: &str =
    r#"{"clientId":"acme-client","clientSecret":"acme-secret","region":"ap-south-1"}"#;
const TOKEN: &str = r#"{"access_token":"tok-1","token_type":"bearer","expires_in":86399}"#;

/// A request the flow sent: destination, path, headers and body.
type SentRequest = (Destination, String, Vec<(String, String)>, String);

/// Drives a flow to its end: answers each request with the next scripted result for its
/// destination, jumps the clock over every wait, and records what happened.
struct Driver {
    now_ms: u64,
    tenant_service: VecDeque<CalloutResult>,
    login: VecDeque<CalloutResult>,
    tenant_service_calls: u32,
    login_calls: u32,
    /// (destination kind, when sent), in order.
    sent_at: Vec<(&'static str, u64)>,
    requests: Vec<SentRequest>,
    /// How long after sending each answer is handled (a busy or idle driver).
    answer_delay_ms: u64,
}

fn ok(body: &str) -> CalloutResult {
    status(200, body)
}

fn status(status: u16, body: &str) -> CalloutResult {
    CalloutResult::Response {
        status,
        body: SecretBytes::new(body.as_bytes().to_vec()),
        retry_after_secs: None,
    }
}

impl Driver {
    fn new(tenant_service: Vec<CalloutResult>, login: Vec<CalloutResult>) -> Self {
        Self {
            now_ms: START_MS,
            tenant_service: tenant_service.into(),
            login: login.into(),
            tenant_service_calls: 0,
            login_calls: 0,
            sent_at: Vec::new(),
            requests: Vec::new(),
            answer_delay_ms: 0,
        }
    }

    fn run(
        &mut self,
        provider: Provider,
        config: &FetchConfig,
    ) -> Result<FetchedToken, TokenError> {
        let key = TokenKey::new(provider, TenantId::parse("acme").unwrap());
        let mut flow = FetchFlow::new(key, config);
        for _ in 0..100 {
            match flow.poll(self.now_ms) {
                Step::Send(request) => {
                    let headers = request
                        .headers
                        .iter()
                        .map(|(name, value)| ((*name).to_owned(), value.expose().to_owned()))
                        .collect();
                    self.requests.push((
                        request.destination.clone(),
                        request.path.clone(),
                        headers,
                        String::from_utf8_lossy(request.body.expose()).into_owned(),
                    ));
                    let result = match request.destination {
                        Destination::TenantService => {
                            self.tenant_service_calls += 1;
                            self.sent_at.push(("tenant", self.now_ms));
                            self.tenant_service.pop_front()
                        }
                        Destination::GenesysLogin { .. } | Destination::TokenEndpoint { .. } => {
                            self.login_calls += 1;
                            self.sent_at.push(("login", self.now_ms));
                            self.login.pop_front()
                        }
                    };
                    let result = result.expect("the script ran out of answers");
                    if matches!(result, CalloutResult::NoResponse) {
                        // No answer means the attempt ran into its timeout.
                        self.now_ms += request.timeout_ms;
                    }
                    self.now_ms += self.answer_delay_ms;
                    flow.handle_response(self.now_ms, result);
                }
                Step::WaitUntil { at_ms, .. } => {
                    assert!(at_ms > self.now_ms, "a wait must lie in the future");
                    self.now_ms = at_ms;
                }
                Step::AwaitResponse => panic!("no response is outstanding in this driver"),
                Step::Done(result) => return result,
            }
        }
        panic!("the flow did not finish in 100 steps");
    }

    fn waits(&self) -> Vec<u64> {
        self.sent_at
            .windows(2)
            .map(|pair| pair[1].1 - pair[0].1)
            .collect()
    }
}

fn genesys(
    tenant_service: Vec<CalloutResult>,
    login: Vec<CalloutResult>,
) -> (Driver, Result<FetchedToken, TokenError>) {
    let mut driver = Driver::new(tenant_service, login);
    let result = driver.run(Provider::genesys(), &FetchConfig::default());
    (driver, result)
}

#[test]
fn cache_miss_fetches_credentials_then_exchanges_them() {
    let (driver, result) = genesys(vec![ok(GENESYS_CREDENTIALS)], vec![ok(TOKEN)]);
    let token = result.unwrap();
    assert_eq!(token.access_token.expose(), "tok-1");
    assert_eq!(token.expires_in_secs, 86399);
    assert_eq!(token.expires_at_ms, START_MS + 86_399_000);
    assert!(token.cacheable);
    assert_eq!((driver.tenant_service_calls, driver.login_calls), (1, 1));

    let (destination, path, headers, _) = &driver.requests[0];
    assert_eq!(*destination, Destination::TenantService);
    assert_eq!(path, "/tenants/acme/credentials/genesys");
    assert!(headers.contains(&("x-service-name".into(), "tokengate".into())));
    let (destination, path, headers, _) = &driver.requests[1];
    assert_eq!(
        *destination,
        Destination::GenesysLogin {
            region: "ap-south-1".into(),
            host: "login.aps1.pure.cloud".into()
        }
    );
    assert_eq!(path, "/oauth/token");
    assert!(headers.contains(&(
        "authorization".into(),
        "Basic YWNtZS1jbGllbnQ6YWNtZS1zZWNyZXQ=".into()
    )));
    assert!(headers.contains(&(
        "content-type".into(),
        "application/x-www-form-urlencoded".into()
    )));
}

#[test]
fn tenant_service_503_503_200_succeeds_after_three_calls_with_backoff() {
    let (driver, result) = genesys(
        vec![status(503, ""), status(503, ""), ok(GENESYS_CREDENTIALS)],
        vec![ok(TOKEN)],
    );
    assert!(result.is_ok());
    assert_eq!(driver.tenant_service_calls, 3);
    assert_eq!(driver.waits(), vec![500, 1000, 0]);
}

#[test]
fn tenant_service_503_three_times_fails_with_503_after_three_calls() {
    let (driver, result) = genesys(
        vec![status(503, ""), CalloutResult::NoResponse, status(502, "")],
        vec![],
    );
    let error = result.unwrap_err();
    assert_eq!(
        (error.code, error.http_status()),
        (ErrorCode::TenantServiceUnavailable, 503)
    );
    assert_eq!((driver.tenant_service_calls, driver.login_calls), (3, 0));
    assert!(
        !error.message.contains("deadline"),
        "the retries, not the deadline, ran out: {}",
        error.message
    );
}

#[test]
fn tenant_service_429_is_retried_and_another_4xx_fails_at_once() {
    let (driver, result) = genesys(
        vec![status(429, ""), ok(GENESYS_CREDENTIALS)],
        vec![ok(TOKEN)],
    );
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(driver.tenant_service_calls, 2);

    let (driver, result) = genesys(vec![status(403, "")], vec![]);
    let error = result.unwrap_err();
    assert_eq!(
        (error.code, error.http_status()),
        (ErrorCode::TenantServiceUnavailable, 503)
    );
    assert_eq!(driver.tenant_service_calls, 1);
}

#[test]
fn tenant_service_404_is_not_retried() {
    let (driver, result) = genesys(vec![status(404, "")], vec![]);
    let error = result.unwrap_err();
    assert_eq!(
        (error.code, error.http_status()),
        (ErrorCode::CredentialsNotFound, 404)
    );
    assert_eq!(driver.tenant_service_calls, 1);
}

#[test]
fn tenant_service_400_is_an_invalid_request_not_retried() {
    let (driver, result) = genesys(vec![status(400, "")], vec![]);
    assert_eq!(result.unwrap_err().code, ErrorCode::InvalidRequest);
    assert_eq!(driver.tenant_service_calls, 1);
}

#[test]
fn credentials_without_client_id_are_not_found_and_never_exchanged() {
    let (driver, result) = genesys(vec![ok(r#"{"data":{"region":"eu-west-1"}}"#)], vec![]);
    assert_eq!(result.unwrap_err().code, ErrorCode::CredentialsNotFound);
    assert_eq!(driver.login_calls, 0);
}

#[test]
fn unknown_region_fails_before_any_oauth_call() {
    let body = r#"{"clientId":"c","clientSecret":"s","region":"mars-1"}"#;
    let (driver, result) = genesys(vec![ok(body)], vec![]);
    let error = result.unwrap_err();
    assert_eq!(error.code, ErrorCode::UnknownRegion);
    assert!(error.message.contains("ap-south-1"));
    assert_eq!(driver.login_calls, 0);
}

#[test]
fn oauth_401_is_invalid_grant_after_exactly_one_call() {
    let (driver, result) = genesys(vec![ok(GENESYS_CREDENTIALS)], vec![status(401, "")]);
    assert_eq!(result.unwrap_err().code, ErrorCode::OauthInvalidGrant);
    assert_eq!(driver.login_calls, 1);
}

#[test]
fn oauth_invalid_client_400_is_invalid_grant_after_exactly_one_call() {
    let body = r#"{"error":"invalid_client","description":"client not found","error_description":"client not found"}"#;
    let (driver, result) = genesys(vec![ok(GENESYS_CREDENTIALS)], vec![status(400, body)]);
    assert_eq!(result.unwrap_err().code, ErrorCode::OauthInvalidGrant);
    assert_eq!(driver.login_calls, 1);
}

#[test]
fn oauth_timeout_then_success_returns_the_token() {
    let (driver, result) = genesys(
        vec![ok(GENESYS_CREDENTIALS)],
        vec![CalloutResult::NoResponse, ok(TOKEN)],
    );
    assert_eq!(result.unwrap().access_token.expose(), "tok-1");
    assert_eq!(driver.login_calls, 2);
}

#[test]
fn oauth_three_timeouts_fail_with_exchange_failed() {
    let timeouts = vec![
        CalloutResult::NoResponse,
        CalloutResult::NoResponse,
        CalloutResult::NoResponse,
    ];
    let (driver, result) = genesys(vec![ok(GENESYS_CREDENTIALS)], timeouts);
    assert_eq!(result.unwrap_err().code, ErrorCode::OauthExchangeFailed);
    assert_eq!(driver.login_calls, 3);
    // Each attempt waits out its 10 s timeout, then the backoff.
    assert_eq!(driver.waits(), vec![0, 10_500, 11_000]);
}

#[test]
fn oauth_rate_limit_backs_off_one_then_two_seconds() {
    let limited = r#"{"error":"invalid_request","description":"rate limit exceeded","error_description":"rate limit exceeded"}"#;
    let (driver, result) = genesys(
        vec![ok(GENESYS_CREDENTIALS)],
        vec![status(400, limited), status(429, ""), ok(TOKEN)],
    );
    assert!(result.is_ok());
    assert_eq!(driver.waits(), vec![0, 1000, 2000]);
}

#[test]
fn oauth_retry_after_is_honoured() {
    let limited = CalloutResult::Response {
        status: 429,
        body: SecretBytes::default(),
        retry_after_secs: Some(7),
    };
    let (driver, result) = genesys(vec![ok(GENESYS_CREDENTIALS)], vec![limited, ok(TOKEN)]);
    assert!(result.is_ok());
    assert_eq!(driver.waits(), vec![0, 7000]);
}

#[test]
fn garbage_200_is_retried_never_returned_as_a_token() {
    let (driver, result) = genesys(
        vec![ok(GENESYS_CREDENTIALS)],
        vec![ok(""), ok("<html>"), ok(r#"{"access_token":"t"}"#)],
    );
    assert_eq!(result.unwrap_err().code, ErrorCode::OauthExchangeFailed);
    assert_eq!(driver.login_calls, 3);
}

#[test]
fn whatsapp_token_without_expiry_gets_the_default_ttl() {
    let mut driver = Driver::new(vec![ok(r#"{"systemUserToken":"wa-1"}"#)], vec![]);
    let token = driver
        .run(Provider::whatsapp(), &FetchConfig::default())
        .unwrap();
    assert_eq!(token.access_token.expose(), "wa-1");
    assert_eq!(token.expires_in_secs, 3600);
    assert!(token.cacheable);
    assert_eq!(driver.login_calls, 0);
}

#[test]
fn a_tokens_life_counts_from_when_its_request_was_sent_not_when_its_answer_was_handled() {
    // Each answer is handled 9 s after its request left: the 20 s token still expires
    // 20 s after the OAuth request was sent.
    let mut driver = Driver::new(
        vec![ok(GENESYS_CREDENTIALS)],
        vec![ok(
            r#"{"access_token":"tok-20","token_type":"bearer","expires_in":20}"#,
        )],
    );
    driver.answer_delay_ms = 9_000;
    let token = driver
        .run(Provider::genesys(), &FetchConfig::default())
        .unwrap();
    let (_, oauth_sent_ms) = driver.sent_at[1];
    assert_eq!(oauth_sent_ms, START_MS + 9_000);
    assert_eq!(token.expires_at_ms, oauth_sent_ms + 20_000);
    assert_eq!(token.expires_in_secs, 11, "what is left when handled");
    assert_eq!(driver.now_ms, START_MS + 18_000);

    // A static token without expiresAt: its default lifetime counts from the request.
    let mut driver = Driver::new(vec![ok(r#"{"systemUserToken":"wa-1"}"#)], vec![]);
    driver.answer_delay_ms = 9_000;
    let token = driver
        .run(Provider::whatsapp(), &FetchConfig::default())
        .unwrap();
    assert_eq!(token.expires_at_ms, START_MS + 3_600_000);
}

#[test]
fn a_token_answer_handled_after_the_tokens_life_is_fetched_anew_never_returned() {
    let mut driver = Driver::new(
        vec![ok(GENESYS_CREDENTIALS)],
        vec![
            ok(r#"{"access_token":"dead","token_type":"bearer","expires_in":5}"#),
            ok(r#"{"access_token":"live","token_type":"bearer","expires_in":60}"#),
        ],
    );
    driver.answer_delay_ms = 6_000;
    let token = driver
        .run(Provider::genesys(), &FetchConfig::default())
        .unwrap();
    assert_eq!(token.access_token.expose(), "live");
    assert_eq!(driver.login_calls, 2);
    assert!(token.expires_at_ms > driver.now_ms);
}

#[test]
fn whatsapp_ttl_is_time_to_expiry_minus_the_safety_buffer() {
    let expires_at = tokengate_core::rfc3339::format_rfc3339_ms(START_MS + 1_000_000);
    let body = format!(r#"{{"accessToken":"wa-2","expiresAt":"{expires_at}"}}"#);
    let mut driver = Driver::new(vec![ok(&body)], vec![]);
    let config = FetchConfig {
        whatsapp_safety_buffer_secs: 100,
        ..FetchConfig::default()
    };
    let token = driver.run(Provider::whatsapp(), &config).unwrap();
    assert_eq!(token.expires_in_secs, 900);
    assert_eq!(token.expires_at_ms, START_MS + 900_000);
    assert!(token.cacheable);
}

#[test]
fn whatsapp_token_with_less_than_a_second_before_its_buffer_is_not_cacheable() {
    let expires_at = tokengate_core::rfc3339::format_rfc3339_ms(START_MS + 300_999);
    let body = format!(r#"{{"token":"wa-4","expiresAt":"{expires_at}"}}"#);
    let mut driver = Driver::new(vec![ok(&body)], vec![]);
    let token = driver
        .run(Provider::whatsapp(), &FetchConfig::default())
        .unwrap();
    assert_eq!(token.expires_in_secs, 0);
    assert!(!token.cacheable);
}

#[test]
fn whatsapp_token_inside_the_buffer_is_served_but_not_cacheable() {
    let expires_at = tokengate_core::rfc3339::format_rfc3339_ms(START_MS + 60_000);
    let body = format!(r#"{{"token":"wa-3","expiresAt":"{expires_at}"}}"#);
    let mut driver = Driver::new(vec![ok(&body)], vec![]);
    let token = driver
        .run(Provider::whatsapp(), &FetchConfig::default())
        .unwrap();
    assert_eq!(token.access_token.expose(), "wa-3");
    assert_eq!(token.expires_in_secs, 60 - 300);
    assert!(!token.cacheable);
}

#[test]
fn no_retry_starts_that_the_fetch_deadline_cannot_hold() {
    let config = FetchConfig {
        deadline_ms: 1_500,
        oauth_timeout_ms: 1_000,
        ..FetchConfig::default()
    };
    let mut driver = Driver::new(
        vec![ok(GENESYS_CREDENTIALS)],
        vec![CalloutResult::NoResponse, ok(TOKEN)],
    );
    let error = driver.run(Provider::genesys(), &config).unwrap_err();
    assert_eq!(error.code, ErrorCode::OauthExchangeFailed);
    assert!(error.message.contains("deadline"), "{}", error.message);
    assert_eq!(
        driver.login_calls, 1,
        "the retry at 1.5 s would end after the deadline"
    );
}

#[test]
fn attempt_timeouts_are_cut_to_what_is_left_of_the_deadline() {
    let config = FetchConfig {
        deadline_ms: 3_000,
        ..FetchConfig::default()
    };
    let mut driver = Driver::new(vec![CalloutResult::NoResponse], vec![]);
    let error = driver.run(Provider::genesys(), &config).unwrap_err();
    assert_eq!(error.code, ErrorCode::TenantServiceUnavailable);
    assert_eq!(driver.tenant_service_calls, 1);
    assert_eq!(
        driver.now_ms,
        START_MS + 3_000,
        "the 5 s timeout was cut to 3 s"
    );
}

/// A configuration with the `oauth2` provider `crm` (and `slack`, `static`) from JSON.
fn with_providers(json: &str) -> FetchConfig {
    let documents: BTreeMap<String, ProviderDocument> = serde_json::from_str(json).unwrap();
    FetchConfig {
        providers: ProviderTable::from_documents(&documents).unwrap(),
        ..FetchConfig::default()
    }
}

fn crm() -> Provider {
    Provider::parse("crm").unwrap()
}

const CRM_CREDENTIALS: &str = r#"{"clientId":"crm client","clientSecret":"p&ss"}"#;

#[test]
fn an_oauth2_provider_posts_client_credentials_with_its_scope_to_its_token_endpoint() {
    let config = with_providers(
        r#"{"crm":{"kind":"oauth2","tokenUrl":"https://idp.crm.example/oauth2/token",
             "clientAuth":"client_secret_post","scope":"crm.read","audience":"crm-api"}}"#,
    );
    let token = r#"{"access_token":"crm-1","token_type":"Bearer","expires_in":3600}"#;
    let mut driver = Driver::new(vec![ok(CRM_CREDENTIALS)], vec![ok(token)]);
    let token = driver.run(crm(), &config).unwrap();
    assert_eq!(token.access_token.expose(), "crm-1");
    assert_eq!(token.expires_at_ms, START_MS + 3_600_000);

    assert_eq!(driver.requests[0].1, "/tenants/acme/credentials/crm");
    let (destination, path, headers, body) = &driver.requests[1];
    let Destination::TokenEndpoint { provider, url } = destination else {
        panic!("expected the token endpoint, got {destination:?}");
    };
    assert_eq!(
        (provider, url.authority.as_str()),
        (&crm(), "idp.crm.example")
    );
    assert_eq!(path, "/oauth2/token");
    assert!(!headers.iter().any(|(name, _)| name == "authorization"));
    assert_eq!(
        body,
        "grant_type=client_credentials&client_id=crm+client&client_secret=p%26ss&scope=crm.read&audience=crm-api"
    );
}

#[test]
fn an_oauth2_client_secret_basic_provider_sends_the_form_encoded_pair_in_the_header() {
    let config = with_providers(r#"{"crm":{"kind":"oauth2","tokenUrl":"http://127.0.0.1:9/t"}}"#);
    let token = r#"{"access_token":"crm-1","token_type":"bearer","expires_in":60}"#;
    let mut driver = Driver::new(vec![ok(CRM_CREDENTIALS)], vec![ok(token)]);
    driver.run(crm(), &config).unwrap();
    let (_, _, headers, body) = &driver.requests[1];
    // base64("crm+client:p%26ss")
    assert!(headers.contains(&(
        "authorization".into(),
        "Basic Y3JtK2NsaWVudDpwJTI2c3M=".into()
    )));
    assert_eq!(body, "grant_type=client_credentials");
}

#[test]
fn a_tenant_names_its_token_endpoint_only_among_the_allowed_hosts() {
    let config =
        with_providers(r#"{"crm":{"kind":"oauth2","allowedTokenHosts":["idp.acme.example"]}}"#);
    let token = r#"{"access_token":"crm-1","token_type":"bearer","expires_in":60}"#;
    let allowed =
        r#"{"clientId":"c","clientSecret":"s","tokenUrl":"https://idp.acme.example/token"}"#;
    let mut driver = Driver::new(vec![ok(allowed)], vec![ok(token)]);
    driver.run(crm(), &config).unwrap();
    assert_eq!(driver.requests[1].1, "/token");

    let elsewhere =
        r#"{"clientId":"c","clientSecret":"s","tokenUrl":"https://attacker.example/token"}"#;
    let mut driver = Driver::new(vec![ok(elsewhere)], vec![]);
    let error = driver.run(crm(), &config).unwrap_err();
    assert_eq!(error.code, ErrorCode::CredentialsNotFound);
    assert!(
        error
            .message
            .contains("'attacker.example', which is not allowed"),
        "{}",
        error.message
    );
    assert_eq!(driver.login_calls, 0, "the secret went nowhere");
}

#[test]
fn an_oauth2_invalid_client_is_never_retried_and_a_5xx_is_retried_as_configured() {
    let config = with_providers(
        r#"{"crm":{"kind":"oauth2","tokenUrl":"https://idp/t","retries":1,"defaultExpiresInSecs":300}}"#,
    );
    let rejected = status(
        401,
        r#"{"error":"invalid_client","error_description":"client authentication failed"}"#,
    );
    let mut driver = Driver::new(vec![ok(CRM_CREDENTIALS)], vec![rejected]);
    let error = driver.run(crm(), &config).unwrap_err();
    assert_eq!(error.code, ErrorCode::OauthInvalidGrant);
    assert_eq!(
        error.message,
        "crm rejected the OAuth credentials of tenant acme: client authentication failed"
    );
    assert_eq!(driver.login_calls, 1);

    let no_lifetime = r#"{"access_token":"crm-2","token_type":"Bearer"}"#;
    let mut driver = Driver::new(
        vec![ok(CRM_CREDENTIALS)],
        vec![status(503, ""), ok(no_lifetime)],
    );
    let token = driver.run(crm(), &config).unwrap();
    assert_eq!(
        (token.access_token.expose(), token.expires_in_secs),
        ("crm-2", 300)
    );
    assert_eq!(driver.login_calls, 2);

    let mut driver = Driver::new(
        vec![ok(CRM_CREDENTIALS)],
        vec![status(503, ""), status(502, "")],
    );
    let error = driver.run(crm(), &config).unwrap_err();
    assert_eq!(
        (error.code, driver.login_calls),
        (ErrorCode::OauthExchangeFailed, 2)
    );
}

#[test]
fn a_static_provider_reads_its_token_at_its_own_path_with_its_own_lifetime() {
    let config = with_providers(
        r#"{"slack":{"kind":"static","tenantServicePath":"/v2/{tenant}/secrets/{provider}","defaultTtlSecs":120}}"#,
    );
    let mut driver = Driver::new(vec![ok(r#"{"token":"xoxb-1"}"#)], vec![]);
    let token = driver
        .run(Provider::parse("slack").unwrap(), &config)
        .unwrap();
    assert_eq!(
        (token.access_token.expose(), token.expires_in_secs),
        ("xoxb-1", 120)
    );
    assert_eq!(driver.requests[0].1, "/v2/acme/secrets/slack");
}

#[test]
fn a_provider_that_is_not_configured_ends_the_fetch_before_any_call() {
    let mut driver = Driver::new(vec![], vec![]);
    let error = driver.run(crm(), &FetchConfig::default()).unwrap_err();
    assert_eq!(error.code, ErrorCode::InvalidRequest);
    assert!(
        error.message.starts_with("unsupported provider type 'crm'"),
        "{}",
        error.message
    );
    assert_eq!(driver.tenant_service_calls, 0);
}
