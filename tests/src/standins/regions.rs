//! The Genesys Cloud region table, as the login stand-in knows it.
//!
//! This is deliberately an independent copy of the table in FACTS §4 (sources: the
//! Genesys SDKs' region tables and terraform-provider-genesyscloud). The stand-in
//! exists to check the gateway, so it must not share the gateway's table: a typo
//! there has to show up here as a `wrong host` rejection.

/// Every Genesys Cloud region and its domain. The login host is `login.<domain>`.
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

/// The domain of a Genesys region (`eu-west-1` -> `mypurecloud.ie`), `None` if unknown.
pub fn genesys_domain(region: &str) -> Option<&'static str> {
    GENESYS_REGIONS
        .iter()
        .find(|(name, _)| *name == region)
        .map(|(_, domain)| *domain)
}

/// The login host of a Genesys region (`eu-west-1` -> `login.mypurecloud.ie`), `None` if unknown.
pub fn genesys_login_host(region: &str) -> Option<String> {
    genesys_domain(region).map(|domain| format!("login.{domain}"))
}

/// The region whose login host is `host` (compared case-insensitively, without port).
pub fn region_of_login_host(host: &str) -> Option<&'static str> {
    let host = host.to_ascii_lowercase();
    let domain = host.strip_prefix("login.")?;
    GENESYS_REGIONS
        .iter()
        .find(|(_, d)| *d == domain)
        .map(|(region, _)| *region)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn table_has_seventeen_distinct_regions_and_domains() {
        let regions: HashSet<_> = GENESYS_REGIONS.iter().map(|(r, _)| r).collect();
        let domains: HashSet<_> = GENESYS_REGIONS.iter().map(|(_, d)| d).collect();
        assert_eq!(regions.len(), 17);
        assert_eq!(domains.len(), 17);
    }

    #[test]
    fn login_hosts_follow_facts_table() {
        assert_eq!(
            genesys_login_host("us-east-1").as_deref(),
            Some("login.mypurecloud.com")
        );
        assert_eq!(
            genesys_login_host("us-east-2").as_deref(),
            Some("login.use2.us-gov-pure.cloud")
        );
        assert_eq!(
            genesys_login_host("eu-west-1").as_deref(),
            Some("login.mypurecloud.ie")
        );
        assert_eq!(
            genesys_login_host("ap-south-1").as_deref(),
            Some("login.aps1.pure.cloud")
        );
        assert_eq!(
            genesys_login_host("ap-southeast-2").as_deref(),
            Some("login.mypurecloud.com.au")
        );
        assert_eq!(genesys_login_host("mars-north-1"), None);
    }

    #[test]
    fn login_host_maps_back_to_its_region() {
        for (region, _) in GENESYS_REGIONS {
            let host = genesys_login_host(region).expect("known region");
            assert_eq!(region_of_login_host(&host), Some(region));
        }
        assert_eq!(
            region_of_login_host("LOGIN.MyPureCloud.IE"),
            Some("eu-west-1")
        );
        assert_eq!(region_of_login_host("api.mypurecloud.ie"), None);
        assert_eq!(region_of_login_host("login.example.com"), None);
    }
}
