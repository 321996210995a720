//! Which destination hosts a deployment lets its workers connect to: an operator's
//! allow-list and deny-list of host names (`db.internal`, `*.corp.example`) and address
//! ranges (`10.0.0.0/8`, `::1/128`). A spec is written by a tenant but executed by a
//! worker inside the operator's network, so the operator decides where it may reach.

use std::net::IpAddr;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// A host name, compared case-insensitively.
    Name(String),
    /// `*.example.com`: any name ending in `.example.com`.
    Suffix(String),
    /// An address range; matches an IP-literal host or any address a name resolves to.
    Network { base: IpAddr, prefix: u8 },
}

impl FromStr for HostPattern {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some((base, prefix)) = s.split_once('/') {
            let base: IpAddr = base
                .parse()
                .map_err(|_| format!("{s:?}: {base:?} is not an IP address"))?;
            let max = if base.is_ipv4() { 32 } else { 128 };
            let prefix: u8 = prefix
                .parse()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?}: the prefix length must be 0-{max}"))?;
            return Ok(Self::Network { base, prefix });
        }
        if let Ok(ip) = s
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
        {
            let prefix = if ip.is_ipv4() { 32 } else { 128 };
            return Ok(Self::Network { base: ip, prefix });
        }
        let name = s.to_ascii_lowercase();
        let check = |n: &str| {
            crate::spec::is_network_host(n)
                .then_some(())
                .ok_or_else(|| format!("{s:?} is not a host name, *.domain or address/prefix"))
        };
        match name.strip_prefix("*.") {
            Some(domain) => {
                check(domain)?;
                Ok(Self::Suffix(format!(".{domain}")))
            }
            None => {
                check(&name)?;
                Ok(Self::Name(name))
            }
        }
    }
}

impl HostPattern {
    fn matches_name(&self, host: &str) -> bool {
        match self {
            Self::Name(n) => host.eq_ignore_ascii_case(n),
            Self::Suffix(suffix) => {
                host.len() > suffix.len() && host.to_ascii_lowercase().ends_with(suffix.as_str())
            }
            Self::Network { .. } => false,
        }
    }

    fn matches_addr(&self, addr: IpAddr) -> bool {
        let Self::Network { base, prefix } = self else {
            return false;
        };
        let addr = match (base, addr) {
            // An IPv4 range also covers the IPv4-mapped IPv6 form of its addresses.
            (IpAddr::V4(_), IpAddr::V6(v6)) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => return false,
            },
            (_, a) => a,
        };
        match (base, addr) {
            (IpAddr::V4(b), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(*prefix)).unwrap_or(0);
                u32::from(*b) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(b), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(*prefix)).unwrap_or(0);
                u128::from(*b) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// The operator's rules. Empty lists allow every host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostPolicy {
    pub allow: Vec<HostPattern>,
    pub deny: Vec<HostPattern>,
}

impl HostPolicy {
    /// Parses comma-separated lists of patterns.
    pub fn parse(allow: &str, deny: &str) -> Result<Self, String> {
        let list = |text: &str| -> Result<Vec<HostPattern>, String> {
            text.split(',')
                .filter(|p| !p.trim().is_empty())
                .map(str::parse)
                .collect()
        };
        Ok(Self {
            allow: list(allow)?,
            deny: list(deny)?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Whether a destination may connect to `host` (as written in its URL), which
    /// resolves to `addrs` (empty when not resolved; an IP-literal host counts as its
    /// own address). A deny match on the name or on any address refuses. With an
    /// allow-list, the name must match it, or every address must fall in its ranges.
    pub fn check(&self, host: &str, addrs: &[IpAddr]) -> Result<(), String> {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let mut all: Vec<IpAddr> = addrs.to_vec();
        if let Ok(ip) = host.parse::<IpAddr>() {
            all.push(ip);
        }
        if let Some(rule) = self
            .deny
            .iter()
            .find(|p| p.matches_name(host) || all.iter().any(|a| p.matches_addr(*a)))
        {
            return Err(format!(
                "destination host {host:?} is refused by this deployment's deny-list ({rule})"
            ));
        }
        if self.allow.is_empty() {
            return Ok(());
        }
        let by_name = self.allow.iter().any(|p| p.matches_name(host));
        let by_addr = !all.is_empty()
            && all
                .iter()
                .all(|a| self.allow.iter().any(|p| p.matches_addr(*a)));
        if by_name || by_addr {
            Ok(())
        } else {
            Err(format!(
                "destination host {host:?} is not on this deployment's allow-list"
            ))
        }
    }
}

impl std::fmt::Display for HostPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Name(n) => f.write_str(n),
            Self::Suffix(s) => write!(f, "*{s}"),
            Self::Network { base, prefix } => write!(f, "{base}/{prefix}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn patterns_parse_and_refuse_garbage() {
        assert_eq!(
            "10.0.0.0/8".parse(),
            Ok(HostPattern::Network {
                base: ip("10.0.0.0"),
                prefix: 8
            })
        );
        assert_eq!(
            "DB.Internal".parse(),
            Ok(HostPattern::Name("db.internal".into()))
        );
        assert_eq!(
            "*.corp.example".parse(),
            Ok(HostPattern::Suffix(".corp.example".into()))
        );
        for bad in ["10.0.0.0/33", "x/8", "*.", "a b", "/var/run"] {
            assert!(bad.parse::<HostPattern>().is_err(), "{bad}");
        }
    }

    #[test]
    fn deny_wins_and_matches_names_and_addresses() {
        let policy = HostPolicy::parse("", "127.0.0.0/8, ::1/128, 169.254.0.0/16, *.internal")
            .expect("valid");
        assert!(policy.check("127.0.0.1", &[]).is_err());
        assert!(policy.check("[::1]", &[]).is_err());
        assert!(policy.check("localhost", &[ip("127.0.0.1")]).is_err());
        assert!(policy
            .check("evil.example", &[ip("::ffff:127.0.0.1")])
            .is_err());
        assert!(policy.check("metadata.internal", &[]).is_err());
        assert!(policy.check("db.example", &[ip("10.1.2.3")]).is_ok());
        // "*.internal" does not match "internal" itself, nor "notinternal".
        assert!(policy.check("notinternal", &[]).is_ok());
    }

    #[test]
    fn an_allow_list_admits_only_what_it_names() {
        let policy =
            HostPolicy::parse("*.db.example, 10.20.0.0/16", "10.20.99.0/24").expect("valid");
        assert!(policy.check("orders.db.example", &[]).is_ok());
        assert!(policy.check("10.20.1.1", &[]).is_ok());
        assert!(policy
            .check("pg", &[ip("10.20.1.1"), ip("10.20.1.2")])
            .is_ok());
        assert!(policy
            .check("pg", &[ip("10.20.1.1"), ip("192.168.0.1")])
            .is_err());
        assert!(policy.check("pg", &[]).is_err());
        assert!(
            policy.check("10.20.99.5", &[]).is_err(),
            "deny wins over allow"
        );
        assert!(HostPolicy::default().check("anything", &[]).is_ok());
    }
}
