//! Genesys Cloud regions and their login hosts.
//!
//! The login host of a region is `login.<domain>`; the token endpoint is
//! `POST https://login.<domain>/oauth/token`. The table follows the Genesys SDKs'
//! region tables (the original service's table was wrong for `us-east-1` and
//! `us-east-2` and missed six regions). Operators can override a region's login host,
//! or add a region, without a new release.

use std::collections::BTreeMap;

use crate::error::{ErrorCode, TokenError};
use crate::provider::printable;

/// Every Genesys Cloud region and its domain.
pub const GENESYS_REGIONS: [(&str, &str); 17] = [
    ("us-east-1", "mypurecloud.com"),
    ("us-east-2", "use2.us-gov-pure.cloud"),
    ("us-west-2", "usw2.pure.cloud"),
    ("ca-central-1", "cac1.pure.cloud"),
    ("sa-east-1", "sae1.pure.cloud"),
    ("mx-central-1", "mxc1.pure.cloud"),
    ("eu-west-1", "mypurecloud.ie"),
    ("eu-west-2", "euw2.pure.cloud"),
    ("eu-central-1", "mypurecloud.de"),
    ("eu-central-2", "euc2.pure.cloud"),
    ("me-central-1", "mec1.pure.cloud"),
    ("ap-south-1", "aps1.pure.cloud"),
    ("ap-northeast-1", "mypurecloud.jp"),
    ("ap-northeast-2", "apne2.pure.cloud"),
    ("ap-northeast-3", "apne3.pure.cloud"),
    ("ap-southeast-1", "apse1.pure.cloud"),
    ("ap-southeast-2", "mypurecloud.com.au"),
];

/// Path of the Genesys token endpoint on every login host.
pub const OAUTH_TOKEN_PATH: &str = "/oauth/token";

/// The region table in force: the built-in regions plus the operator's overrides.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegionTable {
    /// Region -> login host, taking precedence over the built-in table.
    overrides: BTreeMap<String, String>,
}

impl RegionTable {
    /// A table whose `overrides` (region -> login host) win over the built-in regions.
    pub fn with_overrides(overrides: BTreeMap<String, String>) -> Self {
        Self { overrides }
    }

    /// The login host of `region`, or `UNKNOWN_REGION` naming the valid regions.
    pub fn login_host(&self, region: &str) -> Result<String, TokenError> {
        if let Some(host) = self.overrides.get(region) {
            return Ok(host.clone());
        }
        GENESYS_REGIONS
            .iter()
            .find(|(name, _)| *name == region)
            .map(|(_, domain)| format!("login.{domain}"))
            .ok_or_else(|| {
                TokenError::new(
                    ErrorCode::UnknownRegion,
                    format!(
                        "unknown Genesys region '{}'. Valid regions: {}",
                        printable(region),
                        self.region_names().join(", ")
                    ),
                )
            })
    }

    /// The full token endpoint URL of `region`, e.g. `https://login.aps1.pure.cloud/oauth/token`.
    pub fn oauth_url(&self, region: &str) -> Result<String, TokenError> {
        Ok(format!(
            "https://{}{OAUTH_TOKEN_PATH}",
            self.login_host(region)?
        ))
    }

    /// Every region this table resolves, built-in and overridden, sorted.
    pub fn region_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = GENESYS_REGIONS.iter().map(|(name, _)| *name).collect();
        names.extend(self.overrides.keys().map(String::as_str));
        // An insertion sort: a few dozen names for an error message, and no whole sort
        // implementation in the wasm module for them.
        for sorted in 1..names.len() {
            let mut at = sorted;
            while at > 0 && names[at - 1] > names[at] {
                names.swap(at - 1, at);
                at -= 1;
            }
        }
        names.dedup();
        names
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn ap_south_1_resolves_to_the_aps1_login_endpoint() {
        let url = RegionTable::default().oauth_url("ap-south-1").unwrap();
        assert_eq!(url, "https://login.aps1.pure.cloud/oauth/token");
    }

    #[test]
    fn us_east_regions_follow_the_sdk_table_not_the_seed() {
        let table = RegionTable::default();
        assert_eq!(
            table.login_host("us-east-1").unwrap(),
            "login.mypurecloud.com"
        );
        assert_eq!(
            table.login_host("us-east-2").unwrap(),
            "login.use2.us-gov-pure.cloud"
        );
    }

    #[test]
    fn all_seventeen_regions_resolve() {
        let table = RegionTable::default();
        assert_eq!(table.region_names().len(), 17);
        for (region, domain) in GENESYS_REGIONS {
            assert_eq!(table.login_host(region).unwrap(), format!("login.{domain}"));
        }
    }

    #[test]
    fn unknown_region_is_an_error_listing_the_valid_ones() {
        let err = RegionTable::default().login_host("invalid").unwrap_err();
        assert_eq!(err.code, ErrorCode::UnknownRegion);
        assert!(err.message.contains("'invalid'"), "{}", err.message);
        assert!(
            err.message.contains("ap-south-1, ap-southeast-1"),
            "{}",
            err.message
        );
    }

    #[test]
    fn overrides_replace_a_login_host_and_can_add_regions() {
        let table = RegionTable::with_overrides(BTreeMap::from([
            ("eu-west-1".to_owned(), "login.eu.example".to_owned()),
            ("lab-1".to_owned(), "login.lab.example".to_owned()),
        ]));
        assert_eq!(table.login_host("eu-west-1").unwrap(), "login.eu.example");
        assert_eq!(table.login_host("lab-1").unwrap(), "login.lab.example");
        assert_eq!(
            table.login_host("eu-west-2").unwrap(),
            "login.euw2.pure.cloud"
        );
        let names = table.region_names();
        assert_eq!(names.len(), 18);
        assert!(names.windows(2).all(|pair| pair[0] < pair[1]), "{names:?}");
    }
}
