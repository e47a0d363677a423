//! `tracer serve`: keep tracing and serve what is known over HTTP, for
//! monitoring. `/metrics` (Prometheus), `/report` (the JSON report),
//! `/flamegraph.svg`; with `--push`, pprof profiles to Pyroscope. `metrics`
//! renders, `http` speaks just enough HTTP, `push` sends profiles; this
//! file is what serve does in the driver's loop. Snapshots feed the same
//! `LiveView` as `tracer top` (growth, symbolized rows), sorted by bytes.

pub mod http;
pub mod metrics;
pub mod push;

use std::{io, net::SocketAddr, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
    time::{interval_at, Instant, Interval, MissedTickBehavior},
};

use self::http::{Request, Response};
use crate::{
    cli::ServeConfig,
    driver::{self, End, Flow, FrontEnd, LastLook, OnSignal},
    frontends::live_view::{refresh, LiveView, SortKey},
    lifecycle::watch::TargetWatch,
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
    target: TargetWatch,
    config: ServeConfig,
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
    let (jobs_tx, jobs) = mpsc::channel::<Job>(64);
    let every = config.interval.max(Duration::from_millis(100));
    let mut refreshes = interval_at(Instant::now() + every, every);
    refreshes.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let push_every = config.push_interval.max(Duration::from_secs(1));
    let mut pushes = interval_at(Instant::now() + push_every, push_every);
    pushes.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let serve = Serve {
        view,
        process,
        config,
        listener,
        jobs_tx,
        jobs,
        refreshes,
        pushes,
        last_push: unix_seconds(),
    };
    driver::run(serve, trace, target).await
}

struct Serve {
    view: LiveView,
    /// The first process's name, for the pushed profiles.
    process: String,
    config: ServeConfig,
    listener: TcpListener,
    /// Connections hand their requests to the loop, which owns the trace.
    jobs_tx: mpsc::Sender<Job>,
    jobs: mpsc::Receiver<Job>,
    refreshes: Interval,
    pushes: Interval,
    /// Unix seconds: the start of the next pushed profile's span.
    last_push: u64,
}

enum Event {
    Refresh,
    Push,
    Accepted(io::Result<(TcpStream, SocketAddr)>),
    Job(Job),
}

impl FrontEnd for Serve {
    type Event = Event;
    const ON_SIGNAL: OnSignal = OnSignal::Stop;

    async fn next(&mut self) -> Event {
        tokio::select! {
            _ = self.refreshes.tick() => Event::Refresh,
            _ = self.pushes.tick(), if self.config.push.is_some() => Event::Push,
            accepted = self.listener.accept() => Event::Accepted(accepted),
            Some(job) = self.jobs.recv() => Event::Job(job),
        }
    }

    fn event(&mut self, trace: &mut LiveTrace, event: Event) -> Result<Flow> {
        match event {
            Event::Refresh => refresh(trace, &mut self.view)?,
            Event::Push => {
                if let Some(endpoint) = self.config.push.clone() {
                    self.push(trace, endpoint)?;
                }
            }
            Event::Accepted(accepted) => {
                if let Ok((stream, _)) = accepted {
                    tokio::spawn(connection(stream, self.jobs_tx.clone()));
                }
            }
            Event::Job((request, reply)) => {
                let _ = reply.send(answer(&request, trace, &self.view, &self.config));
            }
        }
        Ok(Flow::Continue)
    }

    fn last_look(&mut self, trace: &mut LiveTrace, _process: LastLook<'_>) -> Result<Flow> {
        refresh(trace, &mut self.view)?;
        Ok(Flow::Continue)
    }

    fn exited(&mut self, trace: &mut LiveTrace, _code: Option<i32>) -> Result<Flow> {
        eprintln!("tracer: PID {} exited; stopping", trace.run.pid);
        Ok(Flow::Stop)
    }

    fn end(self, _trace: &mut LiveTrace, _end: End) -> Result<ExitCode> {
        Ok(ExitCode::SUCCESS)
    }
}

impl Serve {
    /// Sends a pprof profile of the view's snapshot since the last push.
    fn push(&mut self, trace: &mut LiveTrace, endpoint: push::Endpoint) -> Result<()> {
        let now = unix_seconds();
        let report = trace.report_every_stack(&self.view.shown);
        let host_process = trace.primary().process.clone();
        let profile = output::pprof::render(&report, &|module| {
            crate::target::elf::build_id(&host_process.host_path(module))
        })?;
        let name = push::application_name(trace.run.pid, &self.process);
        let request = push::request(&endpoint, &name, self.last_push, now, &profile);
        self.last_push = now;
        // Sent off the loop: a slow backend must not stall scrapes.
        tokio::spawn(async move {
            if let Err(e) = push::send(&endpoint, request).await {
                eprintln!(
                    "tracer: push to {}:{} failed: {e:#}",
                    endpoint.host, endpoint.port
                );
            }
        });
        Ok(())
    }
}

/// One connection: read the request, let the loop answer, write it back.
async fn connection(mut stream: TcpStream, jobs: mpsc::Sender<Job>) {
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
    config: &ServeConfig,
) -> Response {
    if request.method != "GET" && request.method != "HEAD" {
        return Response::error(405, "only GET and HEAD");
    }
    match request.path.as_str() {
        "/metrics" => Response::ok(
            metrics::CONTENT_TYPE,
            metrics::render(view, &exported(trace, view.ended.is_none()), config.top),
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
