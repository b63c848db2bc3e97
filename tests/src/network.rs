//! A network the harness controls: one TCP proxy per directed link between
//! members, so a test can cut links (a partition, an isolated leader, a
//! one-way cut) without root. Member A dials member B through the proxy of
//! link A→B (`serve --route B=PROXY`); cutting that link closes its open
//! connections and refuses new ones, so nothing A sends reaches B, while
//! B→A, a proxy of its own, may still work. Clients reach members directly.
//!
//! The proxies run on a thread and runtime of their own, so they outlive any
//! one test runtime and never wait on the test's tasks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// One directed link's proxy.
struct Link {
    /// Where the sender dials.
    listen: String,
    cut: Arc<AtomicBool>,
    /// Bumped on every cut, so open connections close.
    generation: watch::Sender<u64>,
}

/// Every link between the members `1..=max_id`, each through a proxy.
pub struct Network {
    links: BTreeMap<(u64, u64), Link>,
    _runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

impl Network {
    /// Proxies for every ordered pair of ids in `addresses` (id -> where
    /// that member listens), listening on free loopback ports.
    pub fn start(addresses: &BTreeMap<u64, String>) -> Network {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .thread_name("harness-network")
            .build()
            .expect("network runtime");
        let mut links = BTreeMap::new();
        for &from in addresses.keys() {
            for (&to, target) in addresses {
                if from == to {
                    continue;
                }
                // Bound here and held, so the address is taken before any
                // member starts. Port 0: the kernel picks one that nothing
                // holds, and no outgoing connection can take it while it is
                // bound (a port picked by `free_port` and bound a moment
                // later could be taken in between; that happened once).
                let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).expect("a proxy port");
                listener.set_nonblocking(true).expect("nonblocking");
                let listen = listener.local_addr().expect("address").to_string();
                let cut = Arc::new(AtomicBool::new(false));
                let (generation, _) = watch::channel(0);
                let (target, cut_flag, changes) = (target.clone(), cut.clone(), generation.subscribe());
                runtime.spawn(async move {
                    let listener = TcpListener::from_std(listener).expect("a tokio listener");
                    proxy(listener, target, cut_flag, changes).await
                });
                links.insert((from, to), Link { listen, cut, generation });
            }
        }
        Network { links, _runtime: Mutex::new(Some(runtime)) }
    }

    /// The `--route` values member `from` starts with: every other member
    /// through its link's proxy.
    pub fn routes_of(&self, from: u64) -> Vec<String> {
        self.links
            .iter()
            .filter(|((a, _), _)| *a == from)
            .map(|((_, to), link)| format!("{to}={}", link.listen))
            .collect()
    }

    /// Cuts the link `from` → `to`: what `from` sends to `to` is lost.
    pub fn cut(&self, from: u64, to: u64) {
        if let Some(link) = self.links.get(&(from, to)) {
            link.cut.store(true, Ordering::SeqCst);
            link.generation.send_modify(|g| *g += 1);
        }
    }

    /// Cuts both directions between every member of `side` and every other.
    pub fn isolate(&self, side: &[u64]) {
        let pairs: Vec<(u64, u64)> = self.links.keys().copied().collect();
        for (from, to) in pairs {
            if side.contains(&from) != side.contains(&to) {
                self.cut(from, to);
            }
        }
    }

    /// Restores every link.
    pub fn heal(&self) {
        for link in self.links.values() {
            link.cut.store(false, Ordering::SeqCst);
        }
    }

    /// The links cut now.
    pub fn cuts(&self) -> Vec<(u64, u64)> {
        self.links.iter().filter(|(_, link)| link.cut.load(Ordering::SeqCst)).map(|(pair, _)| *pair).collect()
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        if let Some(runtime) = self._runtime.lock().unwrap_or_else(|p| p.into_inner()).take() {
            runtime.shutdown_background();
        }
    }
}

/// Accepts connections for one link and pipes each to `target`, until the
/// link is cut (then it closes them, and refuses new ones while it stays cut).
async fn proxy(listener: TcpListener, target: String, cut: Arc<AtomicBool>, generation: watch::Receiver<u64>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else { continue };
        if cut.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        let (target, mut generation) = (target.clone(), generation.clone());
        generation.mark_unchanged();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(&target).await else { return };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (mut inbound, mut outbound) = (inbound, outbound);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                _ = generation.changed() => {}
            }
        });
    }
}
