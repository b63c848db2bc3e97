//! Metrics in the Prometheus text format (version 0.0.4), served over plain
//! HTTP at `/metrics` on `--metrics-listen`. Gauges (term, indexes, role,
//! modules) are read from the member's status when scraped; counters
//! (client requests by method and gRPC code) are kept by the client service,
//! and snapshot transfers by the node.

use crate::histogram::{Histogram, write_header};
use crate::node::{NodeHistograms, ShutdownSignal, SnapshotCounters};
use crate::wire::client_pb::StatusResponse;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use tonic::Code;

/// Client API methods that are counted.
#[derive(Clone, Copy, Debug)]
pub enum Method {
    Write = 0,
    Read = 1,
}

const METHODS: [&str; 2] = ["write", "read"];
/// gRPC codes 0 (OK) to 16.
const CODES: usize = 17;

/// Counters and latencies of the client API, by method and gRPC code.
pub struct RequestCounters {
    by_method_and_code: [[Histogram; CODES]; 2],
    /// Items per message received on `Batch` streams.
    pub batch_items: Histogram,
    /// Writes of one `Batch` message proposed to the core together.
    pub batch_writes_proposed_together: Histogram,
}

impl Default for RequestCounters {
    fn default() -> RequestCounters {
        RequestCounters {
            by_method_and_code: std::array::from_fn(|_| std::array::from_fn(|_| Histogram::durations())),
            batch_items: Histogram::sizes(),
            batch_writes_proposed_together: Histogram::sizes(),
        }
    }
}

impl RequestCounters {
    /// Counts one answered request and how long it took to answer.
    pub fn record(&self, method: Method, code: Code, elapsed: std::time::Duration) {
        let code = (code as usize).min(CODES - 1);
        self.by_method_and_code[method as usize][code].observe_duration(elapsed);
    }
}

/// Refusals of the peer protocol: calls without a member's certificate, and
/// messages from another cluster or whose sender is not the member the
/// connection's certificate names (or not a member at all).
#[derive(Default)]
pub struct PeerCounters {
    pub refused: AtomicU64,
}

/// The text exposition of a member's metrics.
pub fn render(
    status: &StatusResponse,
    counters: &RequestCounters,
    snapshots: &SnapshotCounters,
    peers: &PeerCounters,
    histograms: &NodeHistograms,
    pending: u64,
) -> String {
    let mut out = String::with_capacity(4096);
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ =
            writeln!(out, "# HELP raft_host_{name} {help}\n# TYPE raft_host_{name} gauge\nraft_host_{name} {value}");
    };
    gauge("term", "Current Raft term.", status.term);
    gauge("leader_id", "Id of the leader this member knows (0: none).", status.leader_id);
    gauge("commit_index", "Highest log index known to be committed.", status.commit_index);
    gauge("applied_index", "Highest log index applied to the state machines.", status.applied_index);
    gauge("last_log_index", "Index of the last entry in this member's log.", status.last_log_index);
    gauge("members", "Members of the cluster configuration.", status.members.len() as u64);
    gauge(
        "learners",
        "Members that receive the log without voting.",
        status.members.iter().filter(|m| m.kind == "learner").count() as u64,
    );
    gauge("snapshot_index", "Index the log starts after (its compaction point).", status.snapshot_index);
    gauge("offline", "1 while this member is offline for maintenance.", u64::from(status.offline));
    gauge("requests_pending", "Client requests waiting for an answer.", pending);
    gauge("modules_in_memory", "Module versions held compiled in memory.", status.modules_in_memory);
    gauge("uploads_in_progress", "Module uploads begun through the log and not complete.", status.uploads_in_progress);
    gauge("disk_free_bytes", "Free bytes on the data disk as last read.", status.disk_free_bytes);
    gauge("disk_low", "1 while free disk space is below the reserve (no new entries).", u64::from(status.disk_low));
    gauge(
        "snapshot_staged_bytes",
        "Bytes of received snapshots staged and not yet installed.",
        status.snapshot_staged_bytes,
    );
    gauge(
        "snapshot_receiving_bytes",
        "Bytes of the snapshot being received now (0: none).",
        snapshots.receiving_bytes.load(Ordering::Relaxed),
    );
    let _ = writeln!(out, "# HELP raft_host_role Role of this member (1 for the current one).");
    let _ = writeln!(out, "# TYPE raft_host_role gauge");
    for role in ["follower", "pre-candidate", "candidate", "leader"] {
        let _ = writeln!(out, "raft_host_role{{role=\"{role}\"}} {}", u64::from(status.role == role));
    }
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ =
            writeln!(out, "# HELP raft_host_{name} {help}\n# TYPE raft_host_{name} counter\nraft_host_{name} {value}");
    };
    counter("modules_compiled_total", "Modules compiled since this process started.", status.modules_compiled);
    let load = |value: &AtomicU64| value.load(Ordering::Relaxed);
    counter(
        "peer_refused_total",
        "Peer calls and messages refused: no member certificate, another cluster, or a sender that is not the certificate's member.",
        load(&peers.refused),
    );
    counter("snapshots_sent_total", "Snapshots streamed to members behind the compacted log.", load(&snapshots.sent));
    counter("snapshot_sent_bytes_total", "Bytes of snapshots streamed to other members.", load(&snapshots.sent_bytes));
    counter("snapshot_send_failures_total", "Snapshot streams that did not complete.", load(&snapshots.send_failures));
    counter("snapshots_received_total", "Snapshots received, verified and staged.", load(&snapshots.received));
    counter("snapshot_received_bytes_total", "Bytes of snapshots received.", load(&snapshots.received_bytes));
    counter(
        "snapshot_receive_failures_total",
        "Snapshot streams refused (broken, corrupt, from elsewhere).",
        load(&snapshots.receive_failures),
    );
    counter(
        "modules_loaded_from_cache_total",
        "Modules loaded from the compiled cache instead of compiled.",
        status.modules_loaded_from_cache,
    );
    // The standard process metrics, under the names Prometheus client
    // libraries use, so existing dashboards find them.
    if status.process_resident_bytes > 0 {
        let _ = writeln!(
            out,
            "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n\
             # TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}",
            status.process_cpu_seconds
        );
        let _ = writeln!(
            out,
            "# HELP process_resident_memory_bytes Resident memory size in bytes.\n\
             # TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}",
            status.process_resident_bytes
        );
    }
    if !status.thread_cpu.is_empty() {
        let _ = writeln!(
            out,
            "# HELP raft_host_thread_cpu_seconds_total CPU time of this process by kind of thread: apply \
             (the guests' apply), runtime (network, consensus, log writes), storage (flushes, compactions), other.\n\
             # TYPE raft_host_thread_cpu_seconds_total counter"
        );
        for threads in &status.thread_cpu {
            let _ = writeln!(
                out,
                "raft_host_thread_cpu_seconds_total{{kind=\"{}\"}} {}",
                escape(&threads.kind),
                threads.cpu_seconds
            );
        }
    }
    let _ = writeln!(out, "# HELP raft_host_state_machine_info Active module of each state machine.");
    let _ = writeln!(out, "# TYPE raft_host_state_machine_info gauge");
    for machine in &status.state_machines {
        let _ = writeln!(
            out,
            "raft_host_state_machine_info{{name=\"{}\",module=\"{}\"}} 1",
            escape(&machine.name),
            escape(&machine.module_hash)
        );
    }
    let _ = writeln!(out, "# HELP raft_host_client_requests_total Client requests answered, by method and gRPC code.");
    let _ = writeln!(out, "# TYPE raft_host_client_requests_total counter");
    // Series for codes never answered are left out, except OK.
    let answered = |m: usize| {
        (0..CODES)
            .filter(move |&code| code == 0 || counters.by_method_and_code[m][code].count() > 0)
            .map(move |code| (code, format!("method=\"{}\",code=\"{:?}\"", METHODS[m], Code::from(code as i32))))
    };
    for m in 0..METHODS.len() {
        for (code, labels) in answered(m) {
            let value = counters.by_method_and_code[m][code].count();
            let _ = writeln!(out, "raft_host_client_requests_total{{{labels}}} {value}");
        }
    }
    let name = "raft_host_client_request_duration_seconds";
    write_header(&mut out, name, "Time to answer a client request, by method and gRPC code.");
    for m in 0..METHODS.len() {
        for (code, labels) in answered(m) {
            counters.by_method_and_code[m][code].render(&mut out, name, &labels);
        }
    }
    let name = "raft_host_client_batch_items";
    write_header(&mut out, name, "Writes and reads per message received on Batch streams.");
    counters.batch_items.render(&mut out, name, "");
    let name = "raft_host_client_batch_writes_proposed_together";
    write_header(&mut out, name, "Writes of one Batch message the leader proposed in one go and answered together.");
    counters.batch_writes_proposed_together.render(&mut out, name, "");
    histograms.render(&mut out);
    out
}

/// A label value with `\`, `"` and newlines escaped.
fn escape(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// What a probe of the metrics port asks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// `/healthz`: alive.
    Alive,
    /// `/readyz`: ready for traffic (see `server::health`).
    Ready,
}

/// Where the metrics server gets a fresh exposition for each scrape, and
/// the answers to probes.
pub trait MetricsSource: Send + Sync + 'static {
    fn render(&self) -> impl std::future::Future<Output = Result<String, String>> + Send;
    /// `Ok` with a line to say, or why not.
    fn probe(&self, probe: Probe) -> impl std::future::Future<Output = Result<String, String>> + Send;
}

/// Serves `GET /metrics`, `/healthz` and `/readyz` on `listener` until the
/// member stops. An answer that needs the member's status and does not
/// have it within `wait` is a 503 saying so (the member's threads are
/// wedged or far behind), never a request left hanging.
pub async fn serve<S: MetricsSource>(
    listener: tokio::net::TcpListener,
    source: std::sync::Arc<S>,
    wait: std::time::Duration,
    mut shutdown: ShutdownSignal,
) {
    use http_body_util::Full;
    use hyper::{Request, Response, StatusCode, body::Incoming, header};
    loop {
        let (stream, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = shutdown.wait() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "metrics: accept failed");
                    continue;
                }
            },
        };
        let source = source.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let source = source.clone();
                async move {
                    let text = |status: StatusCode, body: String| {
                        Response::builder()
                            .status(status)
                            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
                            .body(Full::new(bytes::Bytes::from(body)))
                    };
                    let probe = |answer: Result<String, String>| match answer {
                        Ok(line) => text(StatusCode::OK, format!("{line}\n")),
                        Err(why) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
                    };
                    let response = match request.uri().path() {
                        "/metrics" => match within(wait, source.render()).await {
                            Ok(text) => Response::builder()
                                .header(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
                                .body(Full::new(bytes::Bytes::from(text))),
                            Err(error) => text(StatusCode::SERVICE_UNAVAILABLE, format!("{error}\n")),
                        },
                        "/healthz" => probe(within(wait, source.probe(Probe::Alive)).await),
                        "/readyz" => probe(within(wait, source.probe(Probe::Ready)).await),
                        _ => text(StatusCode::NOT_FOUND, "this port serves /metrics, /healthz and /readyz\n".into()),
                    };
                    Ok::<_, Infallible>(response.unwrap_or_else(|_| Response::new(Full::new(bytes::Bytes::new()))))
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(error) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                tracing::debug!(%peer, %error, "metrics connection ended with an error");
            }
        });
    }
}

/// `answer`, or why not once `wait` has passed without it.
async fn within(
    wait: std::time::Duration,
    answer: impl std::future::Future<Output = Result<String, String>>,
) -> Result<String, String> {
    tokio::time::timeout(wait, answer).await.unwrap_or_else(|_| Err(super::health::status_late(wait)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::Shutdown;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A member whose threads answer probes at once, or never.
    struct Member {
        wedged: bool,
    }

    impl MetricsSource for Member {
        async fn render(&self) -> Result<String, String> {
            self.answer("raft_up 1".into()).await
        }
        async fn probe(&self, _: Probe) -> Result<String, String> {
            self.answer("alive".into()).await
        }
    }

    impl Member {
        async fn answer(&self, line: String) -> Result<String, String> {
            if self.wedged {
                std::future::pending::<()>().await;
            }
            Ok(line)
        }
    }

    /// The whole HTTP/1.1 answer to `GET path` (the server closes after it).
    async fn get(address: SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: member\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.expect("read");
        answer
    }

    async fn serving(wedged: bool) -> (SocketAddr, Shutdown) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let shutdown = Shutdown::new();
        let source = std::sync::Arc::new(Member { wedged });
        tokio::spawn(serve(listener, source, std::time::Duration::from_millis(200), shutdown.signal()));
        (address, shutdown)
    }

    #[tokio::test]
    async fn a_wedged_member_answers_probes_and_scrapes_with_503_in_bounded_time() {
        let (address, shutdown) = serving(true).await;
        for path in ["/healthz", "/readyz", "/metrics"] {
            let answer = tokio::time::timeout(std::time::Duration::from_secs(5), get(address, path))
                .await
                .unwrap_or_else(|_| panic!("{path} left hanging"));
            assert!(answer.starts_with("HTTP/1.1 503"), "{path}: {answer}");
            assert!(answer.contains("did not come within 200 ms"), "{path}: {answer}");
        }
        shutdown.begin();
        let (address, shutdown) = serving(false).await;
        assert!(get(address, "/healthz").await.starts_with("HTTP/1.1 200"));
        assert!(get(address, "/metrics").await.contains("raft_up 1"));
        shutdown.begin();
    }
}
