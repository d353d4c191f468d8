//! The benchmark's upstream: a minimal HTTP/1.1 server (hyper, one thread) that answers
//! every request `200 ok` at once, so the proxy in front of it is what gets measured.
//!
//! It copies the request's `Authorization` header into the response header
//! `x-seen-authorization`, so the benchmark can check which token a request carried
//! (the same small cost for every configuration). Runs as its own process
//! (`tokengate-bench echo --listen ADDR`) so it can be pinned to a CPU of its own.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderName};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// Response header carrying the `Authorization` the upstream received.
pub const SEEN_AUTHORIZATION: &str = "x-seen-authorization";

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = Response::new(Full::new(Bytes::from_static(b"ok\n")));
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain"),
    );
    if let Some(value) = request.headers().get(AUTHORIZATION) {
        response
            .headers_mut()
            .insert(HeaderName::from_static(SEEN_AUTHORIZATION), value.clone());
    }
    Ok(response)
}

/// Serves until the process is killed.
pub fn serve(listen: SocketAddr) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(stream), service_fn(answer))
                    .await;
            });
        }
    })
}
