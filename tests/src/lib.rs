//! tokengate-tests: the stand-in upstreams (Tenant Service, Genesys login, WhatsApp-free echo upstream) and the harness that runs real Envoy, Redis, the companion and an OAuth 2.0 authorization server (oidc-provider) for end-to-end tests.
pub mod authserver;
pub mod harness;
pub mod leak_scan;
pub mod redis_cluster;
pub mod standins;
