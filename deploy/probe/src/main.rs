//! `tokengate-probe`: the health check of the containers that have no shell (the
//! companion's distroless image), used by `deploy/docker-compose.yml`.
//!
//! ```text
//! tokengate-probe http://127.0.0.1:7070/readyz
//! ```
//!
//! Sends one `GET` over plain HTTP/1.0 to a numeric IPv4 or IPv6 address (no DNS, no
//! TLS), prints the answer's body on standard output and exits 0 when the status is
//! 2xx, 1 otherwise (another status, no answer within 2 s, a malformed URL). It
//! depends on nothing but the standard library, so it adds ~0.5 MB to an image.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::process::ExitCode;
use std::time::Duration;

/// How long the connection, the request and the answer may take, each.
const TIMEOUT: Duration = Duration::from_secs(2);

/// Why the probe failed.
#[derive(Debug)]
enum ProbeError {
    /// The argument is not `http://<ip>:<port><path>`.
    Url(String),
    /// Connecting, writing or reading failed.
    Io(std::io::Error),
    /// The answer is not an HTTP status line.
    Answer,
    /// A status other than 2xx.
    Status(u16),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(url) => write!(f, "expected http://<ip>:<port>/<path>, got {url:?}"),
            Self::Io(error) => write!(f, "{error}"),
            Self::Answer => write!(f, "the answer is not HTTP"),
            Self::Status(status) => write!(f, "status {status}"),
        }
    }
}

/// `http://127.0.0.1:7070/readyz` as (address, path).
fn parse_url(url: &str) -> Result<(SocketAddr, &str), ProbeError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ProbeError::Url(url.to_owned()))?;
    let (authority, path) = rest.find('/').map_or((rest, "/"), |at| rest.split_at(at));
    let address = authority
        .parse()
        .map_err(|_| ProbeError::Url(url.to_owned()))?;
    Ok((address, path))
}

/// The status and body of `GET path` at `address`.
fn get(address: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), ProbeError> {
    let mut stream = TcpStream::connect_timeout(&address, TIMEOUT).map_err(ProbeError::Io)?;
    stream
        .set_read_timeout(Some(TIMEOUT))
        .map_err(ProbeError::Io)?;
    stream
        .set_write_timeout(Some(TIMEOUT))
        .map_err(ProbeError::Io)?;
    // One write: the whole request in one segment.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {address}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(ProbeError::Io)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(ProbeError::Io)?;
    let head_end = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or(ProbeError::Answer)?;
    let status_line = answer[..head_end]
        .split(|b| *b == b'\n')
        .next()
        .unwrap_or_default();
    let status = std::str::from_utf8(status_line)
        .ok()
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or(ProbeError::Answer)?;
    Ok((status, answer[head_end + 4..].to_vec()))
}

fn probe(url: &str) -> Result<Vec<u8>, ProbeError> {
    let (address, path) = parse_url(url)?;
    let (status, body) = get(address, path)?;
    if (200..300).contains(&status) {
        Ok(body)
    } else {
        Err(ProbeError::Status(status))
    }
}

fn main() -> ExitCode {
    let url = std::env::args().nth(1).unwrap_or_default();
    match probe(&url) {
        Ok(body) => {
            // A closed standard output does not make a healthy service unhealthy.
            let _ = std::io::stdout().write_all(&body);
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("tokengate-probe: {url}: {error}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot server answering `answer` to the first connection; its URL.
    fn serve_once(answer: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            // The whole request first: closing on unread bytes would reset the connection.
            let mut request = Vec::new();
            let mut chunk = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let read = stream.read(&mut chunk).unwrap();
                assert!(read > 0, "the request ended early");
                request.extend_from_slice(&chunk[..read]);
            }
            stream.write_all(answer.as_bytes()).unwrap();
        });
        format!("http://{address}/readyz")
    }

    #[test]
    fn a_2xx_answer_succeeds_with_its_body() {
        let url = serve_once("HTTP/1.1 200 OK\r\ncontent-length: 17\r\n\r\n{\"status\":\"ready\"}");
        assert_eq!(probe(&url).unwrap(), b"{\"status\":\"ready\"}");
    }

    #[test]
    fn another_status_fails() {
        let url = serve_once("HTTP/1.1 503 Service Unavailable\r\n\r\n{}");
        assert!(matches!(probe(&url), Err(ProbeError::Status(503))));
    }

    #[test]
    fn no_listener_and_bad_urls_fail() {
        let closed = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(matches!(
            probe(&format!("http://{closed}/")),
            Err(ProbeError::Io(_))
        ));
        for url in ["", "https://127.0.0.1:1/", "http://localhost:7070/readyz"] {
            assert!(matches!(probe(url), Err(ProbeError::Url(_))), "{url}");
        }
        assert_eq!(parse_url("http://[::1]:9901").unwrap().1, "/");
    }
}
