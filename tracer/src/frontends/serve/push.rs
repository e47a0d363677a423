//! `--push URL`: send the current profile (pprof) to a Pyroscope-compatible
//! `/ingest` endpoint every interval, so a fleet's leaks land in the backend
//! it already has. Plain HTTP only: the tracer carries no TLS stack; push
//! to a local agent (e.g. Grafana Alloy's `pyroscope.receive_http`) to
//! reach an HTTPS backend.

use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::timeout,
};

/// Where to push: parsed from `http://host[:port][/prefix]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    /// Path prefix before `/ingest`, without a trailing slash.
    pub prefix: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self> {
        let rest = match url.split_once("://") {
            Some(("http", rest)) => rest,
            Some(("https", _)) => bail!(
                "--push {url}: https is not supported; push to a local agent over http (e.g. Grafana Alloy's pyroscope.receive_http)"
            ),
            _ => bail!("--push {url}: expected http://host[:port][/path]"),
        };
        let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (
                host,
                port.parse()
                    .map_err(|_| anyhow!("--push {url}: bad port '{port}'"))?,
            ),
            None => (authority, 80),
        };
        if host.is_empty() {
            bail!("--push {url}: no host");
        }
        Ok(Endpoint {
            host: host.trim_matches(['[', ']']).to_string(),
            port,
            prefix: path.trim_end_matches('/').to_string(),
        })
    }
}

/// Pyroscope's application name with labels: `tracer.memory{pid=1,process=x}`.
pub fn application_name(pid: u32, process: &str) -> String {
    let clean: String = process
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("tracer.memory{{pid={pid},process={clean}}}")
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The request: `POST /ingest?...` with the profile as the `profile` file
/// of a multipart form, as Pyroscope's ingest API takes pprof.
pub fn request(endpoint: &Endpoint, name: &str, from: u64, until: u64, pprof_gz: &[u8]) -> Vec<u8> {
    let boundary = "tracer-profile-boundary-7f3a9c";
    let mut body = Vec::with_capacity(pprof_gz.len() + 256);
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"profile\"; filename=\"profile.pprof\"\r\nContent-Type: application/octet-stream\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(pprof_gz);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut request = format!(
        "POST {}/ingest?name={}&from={from}&until={until}&format=pprof&spyName=tracer HTTP/1.1\r\n\
         Host: {}:{}\r\nUser-Agent: tracer/{}\r\n\
         Content-Type: multipart/form-data; boundary={boundary}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        endpoint.prefix,
        percent_encode(name),
        endpoint.host,
        endpoint.port,
        env!("CARGO_PKG_VERSION"),
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request
}

/// Sends one request; Ok if the server answered 2xx.
pub async fn send(endpoint: &Endpoint, request: Vec<u8>) -> Result<()> {
    timeout(Duration::from_secs(10), async {
        let mut stream = TcpStream::connect((endpoint.host.as_str(), endpoint.port))
            .await
            .with_context(|| format!("connecting to {}:{}", endpoint.host, endpoint.port))?;
        stream.write_all(&request).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        let head = String::from_utf8_lossy(&response[..response.len().min(256)]).into_owned();
        let status = head.split_whitespace().nth(1).unwrap_or("");
        if !status.starts_with('2') {
            bail!(
                "server answered: {}",
                head.lines().next().unwrap_or("nothing")
            );
        }
        Ok(())
    })
    .await
    .map_err(|_| anyhow!("timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_push_urls() {
        assert_eq!(
            Endpoint::parse("http://pyroscope:4040").unwrap(),
            Endpoint {
                host: "pyroscope".into(),
                port: 4040,
                prefix: String::new()
            }
        );
        assert_eq!(Endpoint::parse("http://h/p/").unwrap().prefix, "/p");
        assert_eq!(Endpoint::parse("http://h").unwrap().port, 80);
        assert!(Endpoint::parse("https://h")
            .unwrap_err()
            .to_string()
            .contains("https is not supported"));
        assert!(Endpoint::parse("h:4040").is_err());
        assert!(Endpoint::parse("http://h:x").is_err());
    }

    #[test]
    fn request_carries_name_times_and_the_profile() {
        let endpoint = Endpoint::parse("http://127.0.0.1:4040").unwrap();
        let name = application_name(7, "my server");
        assert_eq!(name, "tracer.memory{pid=7,process=my_server}");
        let req = request(&endpoint, &name, 10, 20, b"\x1f\x8bPROFILE");
        let text = String::from_utf8_lossy(&req);
        assert!(text.starts_with(
            "POST /ingest?name=tracer.memory%7Bpid%3D7%2Cprocess%3Dmy_server%7D&from=10&until=20&format=pprof&spyName=tracer HTTP/1.1\r\n"
        ), "{text}");
        assert!(text.contains("name=\"profile\""));
        let body_len = req.len() - text.find("\r\n\r\n").unwrap() - 4;
        assert!(text.contains(&format!("Content-Length: {body_len}\r\n")));
    }
}
