//! Just enough HTTP/1.1 for a metrics endpoint: one GET per connection,
//! answered and closed. Prometheus, curl and browsers need no more, and it
//! keeps a web framework out of a tool that runs as root.

use std::time::Duration;

use anyhow::{bail, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

const MAX_REQUEST: usize = 16 * 1024;
const IO_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub query: String,
}

impl Request {
    /// A query parameter's value (no percent-decoding: ours are numbers).
    pub fn param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }
}

pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Self {
        Response {
            status: 200,
            content_type,
            body: body.into(),
        }
    }

    pub fn error(status: u16, message: &str) -> Self {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{message}\n").into_bytes(),
        }
    }
}

/// Parses the request line of a request head.
pub fn parse_head(head: &str) -> Result<Request> {
    let line = head.lines().next().unwrap_or_default();
    let mut words = line.split_whitespace();
    let (Some(method), Some(target), Some(version)) = (words.next(), words.next(), words.next())
    else {
        bail!("malformed request line");
    };
    if !version.starts_with("HTTP/1.") {
        bail!("unsupported protocol {version}");
    }
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Request {
        method: method.to_string(),
        path: path.to_string(),
        query: query.to_string(),
    })
}

pub async fn read_request(stream: &mut TcpStream) -> Result<Request> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    timeout(IO_TIMEOUT, async {
        while !buffer.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                bail!("connection closed before the request ended");
            }
            buffer.extend_from_slice(&chunk[..n]);
            if buffer.len() > MAX_REQUEST {
                bail!("request too large");
            }
        }
        Ok(())
    })
    .await??;
    parse_head(&String::from_utf8_lossy(&buffer))
}

pub async fn write_response(
    stream: &mut TcpStream,
    response: &Response,
    head_only: bool,
) -> Result<()> {
    let reason = match response.status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Internal Server Error",
    };
    let head = format!(
        "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        response.status,
        response.content_type,
        response.body.len()
    );
    timeout(IO_TIMEOUT, async {
        stream.write_all(head.as_bytes()).await?;
        if !head_only {
            stream.write_all(&response.body).await?;
        }
        stream.shutdown().await
    })
    .await??;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_request_lines() {
        let r = parse_head("GET /report?top=5&x=1 HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
        assert_eq!((r.method.as_str(), r.path.as_str()), ("GET", "/report"));
        assert_eq!(r.param("top"), Some("5"));
        assert_eq!(r.param("y"), None);
        assert!(parse_head("GARBAGE\r\n\r\n").is_err());
        assert!(parse_head("GET / SPDY/3\r\n\r\n").is_err());
    }
}
