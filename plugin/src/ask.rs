//! What a request asks the filter for, read from its headers (and, for endpoint mode's
//! `POST /auth/token`, its body), validated before anything else happens: a tenant id
//! that could escape a cache key or a path, a repeated tenant header, an unknown
//! provider or a bad body is refused here, before any cache lookup or callout. Hosts
//! call it with their own header access; the worker gets only validated asks.

use tokengate_core::token_api::{CREDENTIAL_TYPE_HEADER, TOKEN_PATH, TokenRequest};
use tokengate_core::trace::TRACEPARENT_HEADER;
use tokengate_core::{ErrorCode, TenantId, TokenError, TokenKey, Traceparent};

use crate::config::{FilterConfig, Mode};
use crate::worker::{Delivery, RequestIds, TokenAsk};

/// Largest `POST /auth/token` body read.
pub const MAX_TOKEN_REQUEST_BODY: usize = 16 * 1024;

/// A request's headers (and its route), as the host reads them. Text values: bytes that
/// are not UTF-8 become U+FFFD, which no validation accepts.
pub trait RequestHeaders {
    /// The value of header `name` (the first, if repeated).
    fn get(&self, name: &str) -> Option<String>;
    /// Every value of header `name`.
    fn values(&self, name: &str) -> Vec<String>;
    /// The only value of header `name`, or [`Repeated`]. Hosts that can count a
    /// header's values without copying them all override it.
    fn single(&self, name: &str) -> Result<Option<String>, Repeated> {
        let mut values = self.values(name).into_iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(Repeated);
        }
        Ok(first)
    }
    /// The name of the route Envoy chose for the request (`xds.route_name`), if any.
    fn route_name(&self) -> Option<String>;
}

/// A header that names one thing came more than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Repeated;

/// What the request asks for.
#[derive(Debug)]
pub enum Ask {
    /// A token for this key, delivered so.
    Token(Wanted),
    /// Endpoint mode's `POST`: the ask is in the body; read it, then [`from_body`].
    ReadBody,
    /// Nothing the filter can serve: answer this error.
    Refuse(TokenError),
}

/// A validated request for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    /// The token wanted.
    pub key: TokenKey,
    /// How to deliver it.
    pub delivery: Delivery,
    /// Skip the caches (endpoint mode's `forceRefresh`).
    pub force_refresh: bool,
}

impl Wanted {
    /// The ask the worker takes, for request `context_id`.
    pub fn of(self, context_id: u32) -> TokenAsk {
        TokenAsk {
            context_id,
            key: self.key,
            delivery: self.delivery,
            force_refresh: self.force_refresh,
        }
    }
}

/// Reads a request's headers: in inject mode the tenant header (and the route's name
/// when `routes` names providers per route); in endpoint mode `:path`, `:method` and,
/// for the legacy `GET`, the tenant and credential-type headers.
pub fn from_headers(
    config: &FilterConfig,
    headers: &impl RequestHeaders,
    end_of_stream: bool,
) -> Ask {
    match config.mode {
        Mode::Inject => {
            let wanted = single(headers, &config.tenant_header).and_then(|tenant| {
                let tenant_id = TenantId::try_from(tenant.unwrap_or_default())?;
                let route = if config.routes.is_empty() {
                    None
                } else {
                    headers.route_name()
                };
                let provider = config.provider_of_route(route.as_deref()).clone();
                Ok(Wanted {
                    key: TokenKey::new(provider, tenant_id),
                    delivery: Delivery::Inject,
                    force_refresh: false,
                })
            });
            answer(wanted)
        }
        Mode::Endpoint => endpoint(config, headers, end_of_stream),
    }
}

fn endpoint(config: &FilterConfig, headers: &impl RequestHeaders, end_of_stream: bool) -> Ask {
    let path = headers.get(":path").unwrap_or_default();
    if path.split('?').next() != Some(TOKEN_PATH) {
        let error = TokenError::new(ErrorCode::NotFound, format!("no route {TOKEN_PATH} here"));
        return Ask::Refuse(error);
    }
    match headers.get(":method").as_deref().unwrap_or_default() {
        "GET" => answer((|| {
            let tenant = single(headers, &config.tenant_header)?;
            let credential_type = single(headers, CREDENTIAL_TYPE_HEADER)?;
            let request = TokenRequest::from_headers(
                tenant.as_deref(),
                credential_type.as_deref(),
                &config.provider_table,
            )?;
            Ok(respond(request))
        })()),
        "POST" if end_of_stream => Ask::Refuse(TokenError::new(
            ErrorCode::InvalidRequest,
            "the token request has no body",
        )),
        "POST" => Ask::ReadBody,
        _ => Ask::Refuse(TokenError::new(
            ErrorCode::MethodNotAllowed,
            format!("{TOKEN_PATH} takes GET or POST"),
        )),
    }
}

/// Reads where a request comes from: its `x-request-id` and its trace context, a
/// `traceparent` valid by core's rule ([`Traceparent`]) and not repeated (which of two
/// the caller's trace uses cannot be told); any other is ignored, never passed on.
/// Hosts call it only when the worker needs it, never on a plain cache hit.
pub fn request_ids(headers: &impl RequestHeaders) -> RequestIds {
    let mut traceparents = headers.values(TRACEPARENT_HEADER).into_iter();
    let traceparent = match (traceparents.next(), traceparents.next()) {
        (Some(value), None) => Traceparent::parse(&value),
        _ => None,
    };
    RequestIds {
        correlation_id: headers.get("x-request-id"),
        traceparent,
    }
}

/// Refuses a `POST /auth/token` body of `size` bytes before it is read, if too large.
pub fn refuse_body_of(size: usize) -> Option<TokenError> {
    (size > MAX_TOKEN_REQUEST_BODY).then(|| {
        TokenError::new(
            ErrorCode::InvalidRequest,
            format!("the token request body is larger than {MAX_TOKEN_REQUEST_BODY} bytes"),
        )
    })
}

/// Reads endpoint mode's `POST /auth/token` body: `{"tenantId","type","forceRefresh"}`,
/// whose `type` must be a configured provider.
pub fn from_body(config: &FilterConfig, body: &[u8]) -> Ask {
    answer(TokenRequest::from_json(body, &config.provider_table).map(respond))
}

fn respond(request: TokenRequest) -> Wanted {
    Wanted {
        key: request.key,
        delivery: Delivery::Respond,
        force_refresh: request.force_refresh,
    }
}

fn answer(wanted: Result<Wanted, TokenError>) -> Ask {
    wanted.map_or_else(Ask::Refuse, Ask::Token)
}

/// A header that names one thing (the tenant, the credential type); an error when the
/// request carries it more than once, since Envoy would hand the filter only the first
/// value while the app may read another.
fn single(headers: &impl RequestHeaders, name: &str) -> Result<Option<String>, TokenError> {
    headers.single(name).map_err(|Repeated| {
        TokenError::new(
            ErrorCode::InvalidRequest,
            format!("the request carries {name} more than once"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokengate_core::Provider;

    use crate::fake::FakeHeaders as Headers;

    fn config(mode: &str) -> FilterConfig {
        FilterConfig::parse(format!(r#"{{"mode":"{mode}"}}"#).as_bytes()).unwrap()
    }

    fn refused(ask: Ask) -> ErrorCode {
        match ask {
            Ask::Refuse(error) => error.code,
            other => panic!("expected a refusal: {other:?}"),
        }
    }

    #[test]
    fn inject_mode_wants_the_tenants_token_of_the_configured_provider() {
        let headers = Headers::new(vec![("x-tenant-id", "acme"), (":method", "PUT")]);
        let Ask::Token(wanted) = from_headers(&config("inject"), &headers, true) else {
            panic!("expected a token ask");
        };
        assert_eq!(wanted.key.provider, Provider::genesys());
        assert_eq!(wanted.key.tenant_id.as_str(), "acme");
        assert_eq!(wanted.delivery, Delivery::Inject);
    }

    #[test]
    fn a_route_named_in_routes_wants_its_providers_token_and_others_the_default() {
        let config = FilterConfig::parse(
            br#"{"provider":"whatsapp","routes":{"crm-api":"slack"},
                 "providers":{"slack":{"kind":"static"}}}"#,
        )
        .unwrap();
        let ask = |route| {
            let headers = Headers::new(vec![("x-tenant-id", "acme")]).on_route(route);
            match from_headers(&config, &headers, true) {
                Ask::Token(wanted) => wanted.key.provider,
                other => panic!("expected a token ask: {other:?}"),
            }
        };
        assert_eq!(ask("crm-api"), Provider::parse("slack").unwrap());
        assert_eq!(ask("orders"), Provider::whatsapp());
    }

    #[test]
    fn a_missing_invalid_or_repeated_tenant_is_refused() {
        let inject = config("inject");
        for headers in [
            vec![],
            vec![("x-tenant-id", "a/b")],
            vec![("x-tenant-id", "acme"), ("x-tenant-id", "globex")],
        ] {
            let ask = from_headers(&inject, &Headers::new(headers), true);
            assert_eq!(refused(ask), ErrorCode::InvalidRequest);
        }
    }

    #[test]
    fn endpoint_mode_routes_by_path_and_method() {
        let endpoint = config("endpoint");
        let request = |path: &'static str, method: &'static str| {
            Headers::new(vec![
                (":path", path),
                (":method", method),
                ("x-tenant-id", "acme"),
                ("x-credential-type", "whatsapp"),
            ])
        };
        let Ask::Token(wanted) = from_headers(&endpoint, &request("/auth/token?x=1", "GET"), true)
        else {
            panic!("expected a token ask");
        };
        assert_eq!(wanted.key.provider, Provider::whatsapp());
        assert_eq!(wanted.delivery, Delivery::Respond);
        assert!(matches!(
            from_headers(&endpoint, &request("/auth/token", "POST"), false),
            Ask::ReadBody
        ));
        let cases = [
            ("/other", "GET", ErrorCode::NotFound),
            ("/auth/token", "POST", ErrorCode::InvalidRequest),
            ("/auth/token", "PUT", ErrorCode::MethodNotAllowed),
        ];
        for (path, method, code) in cases {
            let ask = from_headers(&endpoint, &request(path, method), true);
            assert_eq!(refused(ask), code, "{method} {path}");
        }
    }

    #[test]
    fn request_ids_keep_a_valid_single_traceparent_only() {
        const TRACE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let ids = request_ids(&Headers::new(vec![
            ("x-request-id", "req-1"),
            ("traceparent", TRACE),
        ]));
        assert_eq!(ids.correlation_id.as_deref(), Some("req-1"));
        assert_eq!(
            ids.traceparent.as_ref().map(Traceparent::as_str),
            Some(TRACE)
        );
        for headers in [
            vec![],
            vec![("traceparent", "00-not-a-trace-01")],
            vec![("traceparent", TRACE), ("traceparent", TRACE)],
        ] {
            assert_eq!(request_ids(&Headers::new(headers)).traceparent, None);
        }
    }

    #[test]
    fn a_post_body_is_read_with_its_force_refresh_flag_and_bounded() {
        let Ask::Token(wanted) = from_body(
            &config("endpoint"),
            br#"{"tenantId":"acme","type":"genesys","forceRefresh":true}"#,
        ) else {
            panic!("expected a token ask");
        };
        assert!(wanted.force_refresh);
        assert_eq!(
            refused(from_body(&config("endpoint"), b"[1]")),
            ErrorCode::InvalidRequest
        );
        assert_eq!(MAX_TOKEN_REQUEST_BODY, 16_384, "the README's 16 KiB");
        assert!(refuse_body_of(MAX_TOKEN_REQUEST_BODY).is_none());
        assert!(refuse_body_of(MAX_TOKEN_REQUEST_BODY + 1).is_some());
    }
}
