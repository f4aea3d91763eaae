//! The operations endpoint: `/metrics` (Prometheus text), `/healthz` (the process is alive and
//! every worker thread runs) and `/readyz` (the source and the output are reachable, and some
//! worker thread still runs).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::METRICS;

/// One run of a `/readyz` check.
pub type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// A dependency `/readyz` checks; each answers `Err(reason)` when unreachable.
pub type Check = Box<dyn Fn() -> CheckFuture + Send + Sync>;

/// A named `/readyz` check that runs `probe` on a clone of `ctx` each time it is asked.
pub fn check<T, F, Fut>(name: &'static str, ctx: T, probe: F) -> (&'static str, Check)
where
    T: Clone + Send + Sync + 'static,
    F: Fn(T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    (
        name,
        Box::new(move || -> CheckFuture { Box::pin(probe(ctx.clone())) }),
    )
}

/// Serves until the task is dropped. Each connection gets its own task.
pub async fn serve(listener: TcpListener, checks: Arc<Vec<(&'static str, Check)>>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let checks = checks.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| route(req, checks.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn text(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    r
}

async fn route(
    req: Request<Incoming>,
    checks: Arc<Vec<(&'static str, Check)>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, PLAIN, "GET only\n"));
    }
    Ok(match req.uri().path() {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            METRICS.render(),
        ),
        "/healthz" if crate::metrics::workers_healthy() => text(StatusCode::OK, PLAIN, "ok\n"),
        "/healthz" => text(
            StatusCode::SERVICE_UNAVAILABLE,
            PLAIN,
            "a worker thread panicked and could not be rebuilt\n",
        ),
        "/readyz" => {
            let mut report = String::new();
            let mut ready = true;
            for (name, check) in checks.iter() {
                let result = tokio::time::timeout(Duration::from_secs(3), check())
                    .await
                    .unwrap_or_else(|_| Err("timed out after 3s".into()));
                match result {
                    Ok(()) => report.push_str(&format!("{name}: ok\n")),
                    Err(e) => {
                        ready = false;
                        report.push_str(&format!("{name}: {e}\n"));
                    }
                }
            }
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            text(status, PLAIN, report)
        }
        _ => text(StatusCode::NOT_FOUND, PLAIN, "not found\n"),
    })
}
