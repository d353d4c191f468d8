//! The benchmark's own clients: an HTTP/1.1 connection (hyper, keep-alive, one request
//! at a time) and a raw Redis connection speaking RESP, both on tokio, so the companion
//! and Redis are measured by the same kind of client.

use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::echo::SEEN_AUTHORIZATION;

/// One keep-alive HTTP/1.1 connection.
#[derive(Debug)]
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

/// What came back.
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// The `Authorization` the echo upstream saw (`x-seen-authorization`).
    pub seen_authorization: Option<String>,
    /// The body.
    pub body: Bytes,
}

impl Conn {
    /// Opens a connection (TCP_NODELAY) and completes the HTTP/1.1 handshake.
    pub async fn connect(addr: SocketAddr) -> Result<Conn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("handshake {addr}: {e}"))?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Conn {
            sender,
            host: addr.to_string(),
        })
    }

    /// `GET path` with `x-tenant-id: tenant`.
    pub async fn get(&mut self, path: &str, tenant: &str) -> Result<Answer, String> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header("host", &self.host)
            .header("x-tenant-id", tenant)
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        self.send(request).await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&mut self, path: &str, body: Bytes) -> Result<Answer, String> {
        let request = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header("host", &self.host)
            .header("content-type", "application/json")
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        self.send(request).await
    }

    async fn send(&mut self, request: Request<Full<Bytes>>) -> Result<Answer, String> {
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let response = self
            .sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let seen_authorization = response
            .headers()
            .get(SEEN_AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok(Answer {
            status,
            seen_authorization,
            body,
        })
    }
}

/// A raw Redis connection (RESP2), for `GET` round trips.
#[derive(Debug)]
pub struct RedisConn {
    stream: BufReader<TcpStream>,
    line: String,
}

impl RedisConn {
    /// Connects (TCP_NODELAY).
    pub async fn connect(addr: SocketAddr) -> Result<RedisConn, String> {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = stream.set_nodelay(true);
        Ok(RedisConn {
            stream: BufReader::new(stream),
            line: String::new(),
        })
    }

    /// `GET key`: the value, or `None` when the key is absent.
    pub async fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, String> {
        let command = format!("*2\r\n$3\r\nGET\r\n${}\r\n{key}\r\n", key.len());
        self.stream
            .get_mut()
            .write_all(command.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        self.line.clear();
        self.stream
            .read_line(&mut self.line)
            .await
            .map_err(|e| e.to_string())?;
        let header = self.line.trim_end();
        let Some(length) = header.strip_prefix('$') else {
            return Err(format!("unexpected Redis reply '{header}'"));
        };
        let Ok(length) = length.parse::<i64>() else {
            return Err(format!("unexpected Redis reply '{header}'"));
        };
        let Ok(length) = usize::try_from(length) else {
            return Ok(None);
        };
        let mut value = vec![0u8; length + 2];
        self.stream
            .read_exact(&mut value)
            .await
            .map_err(|e| e.to_string())?;
        value.truncate(length);
        Ok(Some(value))
    }
}
