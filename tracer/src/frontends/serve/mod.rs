//! `tracer serve`: keep tracing and serve what is known over HTTP, for
//! monitoring. `/metrics` (Prometheus), `/report` (the JSON report),
//! `/flamegraph.svg`; with `--push`, pprof profiles to Pyroscope. `metrics`
//! renders, `http` speaks just enough HTTP, `push` sends profiles;
//! this file is the loop. Snapshots feed the same `LiveView` as `tracer
//! top` (growth, symbolized rows), sorted by bytes.

pub mod http;
pub mod metrics;
pub mod push;

use std::{net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    net::TcpListener,
    sync::{mpsc, oneshot},
    time::{interval_at, Instant, MissedTickBehavior},
};

use self::http::{Request, Response};
use crate::{
    cli::ServeConfig,
    frontends::live_view::{refresh, LiveView, SortKey},
    frontends::report::HOUSEKEEPING,
    lifecycle::watch::{TargetEvent, TargetWatch},
    output::{self, folded::Weight},
    trace::LiveTrace,
};

type Job = (Request, oneshot::Sender<Response>);

/// Binds first, so a taken port fails before anything is attached.
pub async fn bind(address: SocketAddr) -> Result<TcpListener> {
    if !address.ip().is_loopback() {
        eprintln!("tracer: serving on {address}, which is not a loopback address: anyone who can reach it can read stack traces of the target");
    }
    TcpListener::bind(address)
        .await
        .with_context(|| format!("cannot listen on {address}"))
}

pub async fn run(
    mut trace: LiveTrace,
    mut target: TargetWatch,
    options: ServeConfig,
    listener: TcpListener,
) -> Result<ExitCode> {
    let process = trace.primary().process.comm.clone();
    let mut view = LiveView::of(&trace, SortKey::Bytes, false);
    refresh(&mut trace, &mut view)?;
    eprintln!(
        "tracer: serving http://{}/metrics for PID {} ({})",
        listener.local_addr()?,
        trace.run.pid,
        trace.run.command
    );
    let (jobs_tx, mut jobs) = mpsc::channel::<Job>(64);
    let every = options.interval.max(Duration::from_millis(100));
    let mut refreshes = interval_at(Instant::now() + every, every);
    refreshes.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut housekeeping = interval_at(Instant::now() + HOUSEKEEPING, HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let crate::signals::Signals {
        interrupt: mut sigint,
        terminate: mut sigterm,
    } = crate::signals::take()?;
    let push = options.push.clone();
    let push_every = options.push_interval.max(Duration::from_secs(1));
    let mut pushes = interval_at(Instant::now() + push_every, push_every);
    pushes.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_push = unix_seconds();
    loop {
        tokio::select! {
            _ = refreshes.tick() => refresh(&mut trace, &mut view)?,
            _ = housekeeping.tick() => trace.housekeeping(),
            _ = pushes.tick(), if push.is_some() => {
                let now = unix_seconds();
                let report = trace.report_every_stack(&view.shown);
                let host_process = trace.primary().process.clone();
                let profile = output::pprof::render(&report, &|module| {
                    crate::target::elf::build_id(&host_process.host_path(module))
                })?;
                let name = push::application_name(trace.run.pid, &process);
                let endpoint = push.clone().expect("checked by the guard");
                let request = push::request(&endpoint, &name, last_push, now, &profile);
                last_push = now;
                // Sent off the loop: a slow backend must not stall scrapes.
                tokio::spawn(async move {
                    if let Err(e) = push::send(&endpoint, request).await {
                        eprintln!("tracer: push to {}:{} failed: {e:#}", endpoint.host, endpoint.port);
                    }
                });
            }
            accepted = listener.accept() => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(connection(stream, jobs_tx.clone()));
                }
            }
            Some((request, reply)) = jobs.recv() => {
                let _ = reply.send(answer(&request, &mut trace, &view, &options));
            }
            _ = sigint.recv() => break,
            _ = sigterm.recv() => break,
            event = target.next() => match event {
                TargetEvent::Exiting => {
                    trace.main_exiting();
                    let result = refresh(&mut trace, &mut view);
                    target.let_exit();
                    result?;
                }
                TargetEvent::Changed(change) => trace.apply(change, &mut target),
                TargetEvent::Exited(_) => {
                    eprintln!("tracer: PID {} exited; stopping", trace.run.pid);
                    break;
                }
            },
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One connection: read the request, let the loop answer, write it back.
async fn connection(mut stream: tokio::net::TcpStream, jobs: mpsc::Sender<Job>) {
    let request = match http::read_request(&mut stream).await {
        Ok(request) => request,
        Err(e) => {
            let _ =
                http::write_response(&mut stream, &Response::error(400, &format!("{e}")), false)
                    .await;
            return;
        }
    };
    let head_only = request.method == "HEAD";
    let (reply_tx, reply) = oneshot::channel();
    if jobs.send((request, reply_tx)).await.is_err() {
        return;
    }
    if let Ok(response) = reply.await {
        let _ = http::write_response(&mut stream, &response, head_only).await;
    }
}

/// The traced processes as the metrics label them (a process replaced by
/// an exec is its new program).
fn exported(trace: &LiveTrace, serving: bool) -> Vec<metrics::Exported> {
    let mut out: Vec<metrics::Exported> = Vec::new();
    for traced in &trace.processes {
        let entry = metrics::Exported {
            pid: traced.info.pid,
            name: traced.process.comm.clone(),
            up: serving && traced.is_running(),
            resident_bytes: traced
                .is_running()
                .then(|| traced.process.rss_bytes())
                .flatten(),
        };
        match out.iter_mut().find(|e| e.pid == entry.pid) {
            Some(existing) => *existing = entry,
            None => out.push(entry),
        }
    }
    out
}

fn answer(
    request: &Request,
    trace: &mut LiveTrace,
    view: &LiveView,
    options: &ServeConfig,
) -> Response {
    if request.method != "GET" && request.method != "HEAD" {
        return Response::error(405, "only GET and HEAD");
    }
    match request.path.as_str() {
        "/metrics" => Response::ok(
            metrics::CONTENT_TYPE,
            metrics::render(view, &exported(trace, view.ended.is_none()), options.top),
        ),
        "/report" => {
            let top = match request.param("top").map(str::parse::<usize>) {
                None => 0,
                Some(Ok(n)) => n,
                Some(Err(_)) => return Response::error(400, "top must be a number"),
            };
            let report = trace.report(&view.shown, top);
            Response::ok("application/json", output::json::document(&report))
        }
        "/flamegraph.svg" => {
            let report = trace.report(&view.shown, 0);
            match output::flamegraph::render(&report, Weight::Bytes) {
                Ok(svg) => Response::ok("image/svg+xml", svg),
                Err(e) => Response::error(500, &format!("{e:#}")),
            }
        }
        "/" => Response::ok(
            "text/html; charset=utf-8",
            format!(
                "<html><body><h1>tracer: PID {} ({})</h1><ul>\
                 <li><a href=\"/metrics\">/metrics</a> (Prometheus)</li>\
                 <li><a href=\"/report\">/report</a> (JSON; ?top=N)</li>\
                 <li><a href=\"/flamegraph.svg\">/flamegraph.svg</a></li></ul></body></html>\n",
                view.pid,
                html_escape(&view.command)
            ),
        ),
        _ => Response::error(404, "not found: try /metrics, /report or /flamegraph.svg"),
    }
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn html_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
