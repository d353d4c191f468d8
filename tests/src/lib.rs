//! tokengate-tests: the stand-in upstreams (Tenant Service, Genesys login, WhatsApp-free echo upstream) and the harness that runs real Envoy, Redis and the companion for end-to-end tests.
pub mod harness;
pub mod leak_scan;
pub mod standins;
