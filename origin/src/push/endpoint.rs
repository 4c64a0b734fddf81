//! Which subscription endpoints the origin will send to (the SSRF guard).
//!
//! A subscription's endpoint is a URL the *client* chose, and the origin
//! POSTs to it later. Without a rule, any user could make the origin send
//! requests into its own network. So an endpoint must be `https` on a
//! configured push-service host (`PUSH_ALLOWED_HOSTS`, `*.` for
//! subdomains), on the default port, without user info; with
//! `PUSH_ALLOW_LOOPBACK`, `http` or `https` on 127.0.0.1, localhost or
//! [::1] (any port) is accepted too, for local runs and tests. The rule is
//! checked when a subscription is registered and again before every send
//! (the allowlist may have shrunk since), and the push client follows no
//! redirects.

use reqwest::Url;

/// Longest endpoint accepted, in characters.
pub const MAX_ENDPOINT_CHARS: usize = 2048;

/// Hosts that are loopback, as the URL parser writes them (it normalises
/// `127.1` or `0x7f.0.0.1` to `127.0.0.1`, and lower-cases names).
const LOOPBACK_HOSTS: [&str; 3] = ["127.0.0.1", "localhost", "[::1]"];

/// What a subscription endpoint may be.
#[derive(Debug, Clone)]
pub struct EndpointRule {
    /// Lower-case hosts, or `*.domain` for any subdomain of domain.
    pub allowed_hosts: Vec<String>,
    pub allow_loopback: bool,
}

impl EndpointRule {
    /// The endpoint parsed, or why it is refused (a message for the
    /// client; it never echoes the URL, which may carry a token).
    pub fn check(&self, endpoint: &str) -> Result<Url, &'static str> {
        if endpoint.is_empty() {
            return Err("endpoint is empty");
        }
        if endpoint.chars().nth(MAX_ENDPOINT_CHARS).is_some() {
            return Err("endpoint is longer than 2048 characters");
        }
        let url = Url::parse(endpoint).map_err(|_| "endpoint is not an absolute URL")?;
        if !url.username().is_empty() || url.password().is_some() {
            return Err("endpoint must not carry user info");
        }
        let host = url.host_str().ok_or("endpoint has no host")?;
        let scheme = url.scheme();
        if self.allow_loopback
            && LOOPBACK_HOSTS.contains(&host)
            && (scheme == "http" || scheme == "https")
        {
            return Ok(url);
        }
        if scheme != "https" {
            return Err("endpoint must be https");
        }
        // `port()` is None for the scheme's default (443 written or not).
        if url.port().is_some() {
            return Err("endpoint must use the default https port");
        }
        if !self
            .allowed_hosts
            .iter()
            .any(|rule| host_matches(rule, host))
        {
            return Err("endpoint is not on an allowed push service");
        }
        Ok(url)
    }
}

/// Whether `host` (lower case, as the URL parser gives it) matches `rule`:
/// equal, or for `*.domain` a subdomain of domain at any depth.
fn host_matches(rule: &str, host: &str) -> bool {
    match rule.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .is_some_and(|sub| sub.len() > 1 && sub.ends_with('.')),
        None => rule == host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(loopback: bool) -> EndpointRule {
        EndpointRule {
            allowed_hosts: [
                "fcm.googleapis.com",
                "*.notify.windows.com",
                "*.push.apple.com",
            ]
            .map(str::to_owned)
            .to_vec(),
            allow_loopback: loopback,
        }
    }

    #[test]
    fn https_on_an_allowed_host_or_subdomain_passes() {
        for ok in [
            "https://fcm.googleapis.com/fcm/send/abc:def",
            "https://FCM.googleapis.com:443/fcm/send/x",
            "https://wns2-by3p.notify.windows.com/w/?token=abc",
            "https://a.b.push.apple.com/3/device/x",
        ] {
            assert!(rule(false).check(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn everything_else_is_refused() {
        for bad in [
            "",
            "fcm.googleapis.com/fcm/send/x",
            "http://fcm.googleapis.com/fcm/send/x",
            "https://fcm.googleapis.com:8443/x",
            "https://user:pw@fcm.googleapis.com/x",
            "https://user@fcm.googleapis.com/x",
            "https://fcm.googleapis.com.evil.example/x",
            "https://evilfcm.googleapis.com/x",
            "https://notify.windows.com/x",
            "https://evilnotify.windows.com/x",
            "https://push.apple.com/x",
            "https://10.0.0.1/x",
            "https://[::1]/x",
            "https://127.0.0.1/x",
            "http://localhost:8080/x",
            "ftp://fcm.googleapis.com/x",
            "file:///etc/passwd",
        ] {
            assert!(rule(false).check(bad).is_err(), "{bad}");
        }
        let long = format!("https://fcm.googleapis.com/{}", "a".repeat(2048));
        assert!(rule(false).check(&long).is_err());
    }

    #[test]
    fn loopback_passes_only_when_allowed_any_port_http_or_https() {
        for ok in [
            "http://127.0.0.1:9000/push/1",
            "https://127.0.0.1/push/1",
            "http://localhost:1/p",
            "http://LOCALHOST:1/p",
            "http://[::1]:8080/p",
            "http://127.1:9000/p",
        ] {
            assert!(rule(true).check(ok).is_ok(), "{ok}");
            assert!(rule(false).check(ok).is_err(), "{ok}");
        }
        for bad in [
            "http://127.0.0.2:9000/p",
            "http://user@127.0.0.1:9000/p",
            "ws://127.0.0.1:9000/p",
            "http://localhost.evil.example/p",
            "http://10.1.2.3/p",
        ] {
            assert!(rule(true).check(bad).is_err(), "{bad}");
        }
    }
}
