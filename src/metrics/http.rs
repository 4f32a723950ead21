//! The bounded HTTP endpoint that serves `/metrics`: hyper 1.x (HTTP/1 only) on a tokio
//! current-thread runtime running on one thread named `metrics`.
//!
//! Nothing a local client does can starve or bloat it: request heads are capped at
//! [`MAX_HEAD_BYTES`] (hyper answers 431 and closes), a head must arrive within
//! [`HEADER_READ_TIMEOUT`], every connection ends by [`CONNECTION_DEADLINE`] (plus
//! [`CLOSE_GRACE`] to finish a response), at most [`MAX_CONNECTIONS`] are open at once.
//! Past that cap a connection is closed to make room: one that sent no request, else
//! one whose last request is [`STALLED_AFTER`] old, else one open that long; with no such
//! connection the new one is closed at once. The page is rendered at most once per
//! [`PAGE_REUSE`], however many requests arrive. Accept errors (EMFILE, ...) are logged,
//! rate-limited, and followed by a short pause: they never end the listener. A bind
//! failure is logged and retried with a growing delay; the address can be changed while
//! running ([`AddressHandle`]). Dropping the [`HttpServer`] stops the runtime without
//! waiting for any client.
//!
//! At reexec the listening socket is handed to the new program ([`HttpServer::listener`]
//! gives a copy of it; [`HttpServer::start_adopting`] serves on such an inherited one):
//! it never closes, so a scrape during the exec waits in its backlog instead of being
//! refused. Just before the exec, [`HttpServer::drain`] stops accepting and lets the
//! requests in progress finish (idle keep-alive connections are closed), so no scrape
//! is cut half-way by the exec.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tokio::task::AbortHandle;
use tokio::time::{Instant, sleep, sleep_until, timeout};

/// Connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Cap on a request head (request line plus headers): hyper's `max_buf_size`, whose
/// smallest accepted value is exactly this.
pub const MAX_HEAD_BYTES: usize = 8192;
/// A request head must arrive within this (also the idle keep-alive limit).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Every connection is asked to close after this long...
pub const CONNECTION_DEADLINE: Duration = Duration::from_secs(30);
/// ...and dropped if its response is still not out this long after that.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// A connection whose last request is older than this may be closed to make room.
pub const STALLED_AFTER: Duration = Duration::from_secs(5);
/// A page rendered less than this long ago is served again instead of a new render.
pub const PAGE_REUSE: Duration = Duration::from_millis(100);
/// Pause after a failed accept (EMFILE would otherwise spin).
pub const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// At most one log line per this long about failed accepts.
pub const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);
/// First delay before binding again after a failure; it doubles up to [`BIND_RETRY_MAX`].
pub const BIND_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest delay between bind attempts.
pub const BIND_RETRY_MAX: Duration = Duration::from_secs(30);

/// The limits of one server; [`Limits::default`] holds the constants above.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once.
    pub max_connections: usize,
    /// A request head must arrive within this.
    pub header_read_timeout: Duration,
    /// A connection is asked to close after this long.
    pub connection_deadline: Duration,
    /// ... and dropped this long after that.
    pub close_grace: Duration,
    /// A connection whose last request is older than this may be closed to make room.
    pub stalled_after: Duration,
    /// A page rendered less than this long ago is served again.
    pub page_reuse: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            header_read_timeout: HEADER_READ_TIMEOUT,
            connection_deadline: CONNECTION_DEADLINE,
            close_grace: CLOSE_GRACE,
            stalled_after: STALLED_AFTER,
            page_reuse: PAGE_REUSE,
        }
    }
}

/// Listen backlog.
const BACKLOG: u32 = 1024;
/// The Prometheus text format's content type.
pub const CONTENT_TYPE_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Where the server logs: `(syslog priority, message)`.
pub type LogFn = Arc<dyn Fn(u8, &str) + Send + Sync>;
/// Renders the page served at `/metrics`.
pub type RenderFn = Arc<dyn Fn() -> Vec<u8> + Send + Sync>;

/// Errors starting the server (binding is not one: it is retried).
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The tokio runtime could not be built.
    #[error("metrics runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// The `metrics` thread could not be started.
    #[error("metrics thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Changes the address the running server listens on.
#[derive(Clone)]
pub struct AddressHandle {
    tx: Arc<watch::Sender<SocketAddr>>,
}

impl AddressHandle {
    /// Listen on `addr` from now on: the old listener closes once the new one is bound;
    /// a failed bind is logged and retried (the old one serves meanwhile).
    pub fn set(&self, addr: SocketAddr) {
        self.tx.send_replace(addr);
    }
}

/// The running server; dropping it stops it at once.
pub struct HttpServer {
    bound: Arc<Mutex<Option<SocketAddr>>>,
    /// A copy of the listening socket (for a handover at reexec), with the address asked.
    held: Arc<Mutex<Option<(OwnedFd, SocketAddr)>>>,
    conns: Arc<Mutex<Conns>>,
    addr_tx: Arc<watch::Sender<SocketAddr>>,
    /// True while draining for a reexec: nothing new is accepted.
    draining: watch::Sender<bool>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Serve `render()` at `GET /metrics` on `addr`. The first bind is tried before this
    /// returns (so [`HttpServer::addr`] is known when it works); a failure is logged and
    /// retried in the background.
    pub fn start(addr: SocketAddr, render: RenderFn, log: LogFn) -> Result<Self, HttpError> {
        Self::start_with(addr, render, log, Limits::default())
    }

    /// [`HttpServer::start`] with other limits.
    pub fn start_with(
        addr: SocketAddr,
        render: RenderFn,
        log: LogFn,
        limits: Limits,
    ) -> Result<Self, HttpError> {
        Self::start_adopting(addr, None, render, log, limits)
    }

    /// [`HttpServer::start_with`], serving on `listener` (a listening socket inherited
    /// from the program this one replaced, bound for `addr`) instead of binding anew; if
    /// it cannot be used, binds `addr` as usual.
    pub fn start_adopting(
        addr: SocketAddr,
        listener: Option<OwnedFd>,
        render: RenderFn,
        log: LogFn,
        limits: Limits,
    ) -> Result<Self, HttpError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(HttpError::Runtime)?;
        let bound = Arc::new(Mutex::new(None));
        let held = Arc::new(Mutex::new(None));
        let (addr_tx, addr_rx) = watch::channel(addr);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (first_tx, first_rx) = std::sync::mpsc::channel();
        let conns = Arc::new(Mutex::new(Conns::default()));
        let (draining, drain_rx) = watch::channel(false);
        let server = Server {
            draining: drain_rx,
            page: Arc::new(Page {
                render,
                reuse: limits.page_reuse,
                last: Mutex::new(None),
            }),
            log,
            bound: bound.clone(),
            held: held.clone(),
            conns: conns.clone(),
            slots: Arc::new(Semaphore::new(limits.max_connections)),
            limits,
            full: Mutex::new(RateLimited::default()),
        };
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                rt.block_on(server.run(addr_rx, stop_rx, first_tx, listener));
                // Connection tasks are dropped, never awaited: a stuck client cannot
                // hold up shutdown.
                rt.shutdown_background();
            })
            .map_err(HttpError::Thread)?;
        // Wait for the first bind attempt (it does not block: a bounded wait anyway).
        let _ = first_rx.recv_timeout(Duration::from_secs(5));
        Ok(HttpServer {
            bound,
            held,
            draining,
            conns,
            addr_tx: Arc::new(addr_tx),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The address currently bound (the real port with port 0), `None` while not bound.
    pub fn addr(&self) -> Option<SocketAddr> {
        *self.bound.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the listening socket and the address it was asked for (close-on-exec;
    /// `None` while not bound), to hand to the next program at reexec.
    pub fn listener(&self) -> Option<(OwnedFd, SocketAddr)> {
        let held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
        let (fd, want) = held.as_ref()?;
        Some((fd.try_clone().ok()?, *want))
    }

    /// Stop accepting (new connections wait in the backlog) and close every connection
    /// once its request in progress is answered; waits for that, at most `limit`. True
    /// when every connection is closed. [`HttpServer::undrain`] accepts again.
    pub fn drain(&self, limit: Duration) -> bool {
        self.draining.send_replace(true);
        let deadline = std::time::Instant::now() + limit;
        while std::time::Instant::now() < deadline {
            if lock(&self.conns).open.is_empty() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        lock(&self.conns).open.is_empty()
    }

    /// Accept again after [`HttpServer::drain`] (a reexec that failed).
    pub fn undrain(&self) {
        self.draining.send_replace(false);
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        lock(&self.conns).open.len()
    }

    /// A handle to change the address later.
    pub fn address_handle(&self) -> AddressHandle {
        AddressHandle {
            tx: self.addr_tx.clone(),
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One open connection, by accept order.
struct Conn {
    abort: Option<AbortHandle>,
    opened: Instant,
    last_request: Option<Instant>,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    open: BTreeMap<u64, Conn>,
}

impl Conns {
    /// Close one connection to make room, the first found of: the oldest that never
    /// sent a request, the oldest whose last request is `stalled_after` old (stuck or idle
    /// keep-alive), the oldest open for `stalled_after` (a client pipelining requests
    /// without end). False if there is none: every connection is young and busy.
    fn evict_one(&mut self, now: Instant, stalled_after: Duration) -> bool {
        let old = |t: Instant| now.duration_since(t) >= stalled_after;
        let victim = self
            .open
            .iter()
            .filter(|(_, c)| c.abort.is_some())
            .filter_map(|(id, c)| {
                let class = match c.last_request {
                    None => 0,
                    Some(t) if old(t) => 1,
                    Some(_) if old(c.opened) => 2,
                    Some(_) => return None,
                };
                Some((class, *id))
            })
            .min();
        match victim.map(|(_, id)| id) {
            Some(id) => {
                if let Some(a) = self.open.remove(&id).and_then(|c| c.abort) {
                    a.abort();
                }
                true
            }
            None => false,
        }
    }
}

/// The page, rendered at most once per [`Limits::page_reuse`]: many scrapes at once, or
/// one client pipelining requests, cost one render.
struct Page {
    render: RenderFn,
    reuse: Duration,
    last: Mutex<Option<(Instant, Bytes)>>,
}

impl Page {
    fn get(&self) -> Bytes {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        match &*last {
            Some((t, b)) if now.duration_since(*t) < self.reuse => b.clone(),
            _ => {
                let b = Bytes::from((self.render)());
                *last = Some((now, b.clone()));
                b
            }
        }
    }
}

/// Removes its connection from the table when the connection's task ends or is dropped.
struct ConnGuard {
    id: u64,
    conns: Arc<Mutex<Conns>>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.conns).open.remove(&self.id);
    }
}

fn lock(c: &Mutex<Conns>) -> std::sync::MutexGuard<'_, Conns> {
    c.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What woke the accept loop.
enum Wake {
    Stop,
    AddressChanged,
    RetryBind,
    Resume,
    Accepted(std::io::Result<(TcpStream, SocketAddr)>),
}

/// A bind that failed and will be tried again.
struct Pending {
    at: Instant,
    delay: Duration,
    failures: u32,
    last_error: String,
}

struct Listening {
    listener: TcpListener,
    /// The address asked for (with port 0 the bound port differs).
    wanted: SocketAddr,
}

struct Server {
    /// True while draining for a reexec.
    draining: watch::Receiver<bool>,
    page: Arc<Page>,
    log: LogFn,
    bound: Arc<Mutex<Option<SocketAddr>>>,
    held: Arc<Mutex<Option<(OwnedFd, SocketAddr)>>>,
    conns: Arc<Mutex<Conns>>,
    slots: Arc<Semaphore>,
    limits: Limits,
    /// Reports of the connection cap being reached.
    full: Mutex<RateLimited>,
}

/// Counts events and says when one more log line about them is due (at most one per
/// [`ACCEPT_LOG_EVERY`]).
#[derive(Default)]
struct RateLimited {
    since_report: u64,
    last: Option<Instant>,
}

impl RateLimited {
    /// Count one event; `Some(events since the last report)` when a line is due.
    fn hit(&mut self, now: Instant) -> Option<u64> {
        self.since_report += 1;
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < ACCEPT_LOG_EVERY)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.since_report))
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(BACKLOG)
}

async fn accept(l: &Option<Listening>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match l {
        Some(l) => l.listener.accept().await,
        None => std::future::pending().await,
    }
}

async fn wait_until(at: Option<Instant>) {
    match at {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

impl Server {
    async fn run(
        self,
        mut addr_rx: watch::Receiver<SocketAddr>,
        mut stop: oneshot::Receiver<()>,
        first: std::sync::mpsc::Sender<()>,
        inherited: Option<OwnedFd>,
    ) {
        let mut listening: Option<Listening> = None;
        let mut pending: Option<Pending> = None;
        let want = *addr_rx.borrow_and_update();
        match inherited.map(|fd| self.adopt(fd, want)) {
            Some(Ok(l)) => listening = Some(l),
            Some(Err(e)) => {
                self.log(
                    3,
                    &format!(
                        "metrics: the inherited listener cannot be used ({e}); binding {want}"
                    ),
                );
                self.try_bind(want, &mut listening, &mut pending);
            }
            None => self.try_bind(want, &mut listening, &mut pending),
        }
        let _ = first.send(());
        let mut paused_until: Option<Instant> = None;
        let mut accept_errors = RateLimited::default();
        let mut draining_rx = self.draining.clone();
        loop {
            let draining = *draining_rx.borrow_and_update();
            let wake = tokio::select! {
                _ = &mut stop => Wake::Stop,
                r = draining_rx.changed() => match r {
                    Ok(()) => Wake::Resume,
                    Err(_) => Wake::Stop,
                },
                r = addr_rx.changed() => match r {
                    Ok(()) => Wake::AddressChanged,
                    Err(_) => Wake::Stop,
                },
                _ = wait_until(pending.as_ref().map(|p| p.at)) => Wake::RetryBind,
                _ = wait_until(paused_until) => Wake::Resume,
                r = accept(&listening), if paused_until.is_none() && !draining => {
                    Wake::Accepted(r)
                }
            };
            match wake {
                Wake::Stop => return,
                Wake::AddressChanged => {
                    let want = *addr_rx.borrow_and_update();
                    if let Some(l) = listening.as_mut().filter(|l| {
                        l.wanted == want || l.listener.local_addr().is_ok_and(|a| a == want)
                    }) {
                        // Already there (a retry of another address is called off).
                        l.wanted = want;
                        pending = None;
                    } else {
                        pending = None;
                        self.try_bind(want, &mut listening, &mut pending);
                    }
                }
                Wake::RetryBind => {
                    let want = *addr_rx.borrow();
                    self.try_bind(want, &mut listening, &mut pending);
                }
                Wake::Resume => paused_until = None,
                Wake::Accepted(Ok((stream, _))) => self.admit(stream).await,
                Wake::Accepted(Err(e)) => {
                    paused_until = Some(Instant::now() + ACCEPT_PAUSE);
                    self.accept_failed(&e, &mut accept_errors);
                }
            }
        }
    }

    fn log(&self, prio: u8, msg: &str) {
        (self.log)(prio, msg);
    }

    /// Serve on `fd`, a listening socket inherited at reexec, bound for `want`.
    fn adopt(&self, fd: OwnedFd, want: SocketAddr) -> std::io::Result<Listening> {
        let std = std::net::TcpListener::from(fd);
        std.set_nonblocking(true)?;
        let listener = TcpListener::from_std(std)?;
        let local = listener.local_addr()?;
        self.hold(&listener, want);
        *self.bound.lock().unwrap_or_else(PoisonError::into_inner) = Some(local);
        self.log(
            6,
            &format!("metrics on http://{local}/metrics (listener handed over)"),
        );
        Ok(Listening {
            listener,
            wanted: want,
        })
    }

    /// Keep a copy of the listening socket for a handover.
    fn hold(&self, listener: &TcpListener, want: SocketAddr) {
        let copy = listener.as_fd().try_clone_to_owned().ok();
        *self.held.lock().unwrap_or_else(PoisonError::into_inner) = copy.map(|c| (c, want));
    }

    /// Bind `want`; on success it replaces the current listener, on failure the current
    /// one (if any) keeps serving and a retry is scheduled.
    fn try_bind(
        &self,
        want: SocketAddr,
        listening: &mut Option<Listening>,
        pending: &mut Option<Pending>,
    ) {
        match bind(want).and_then(|l| Ok((l.local_addr()?, l))) {
            Ok((local, listener)) => {
                let after = pending
                    .take()
                    .map(|p| format!(" (after {} failed attempt(s))", p.failures))
                    .unwrap_or_default();
                let moved = listening
                    .as_ref()
                    .and_then(|l| l.listener.local_addr().ok())
                    .map(|old| format!("; no longer on {old}"))
                    .unwrap_or_default();
                self.hold(&listener, want);
                *listening = Some(Listening {
                    listener,
                    wanted: want,
                });
                *self.bound.lock().unwrap_or_else(PoisonError::into_inner) = Some(local);
                self.log(
                    6,
                    &format!("metrics on http://{local}/metrics{after}{moved}"),
                );
            }
            Err(e) => {
                let err = e.to_string();
                let (delay, failures, changed) = match pending.take() {
                    None => (BIND_RETRY_FIRST, 1, true),
                    Some(p) => (
                        (p.delay * 2).min(BIND_RETRY_MAX),
                        p.failures + 1,
                        p.last_error != err,
                    ),
                };
                // The first failure, a new error, and then once the delay is at its
                // longest (every 30 s at most).
                if changed || delay == BIND_RETRY_MAX {
                    let serving = listening
                        .as_ref()
                        .and_then(|l| l.listener.local_addr().ok())
                        .map(|a| format!("still serving on {a}"))
                        .unwrap_or_else(|| "the VMs run without it".into());
                    self.log(
                        3,
                        &format!(
                            "metrics: cannot listen on {want}: {err}; {serving}; retrying in {} s",
                            delay.as_secs()
                        ),
                    );
                }
                *pending = Some(Pending {
                    at: Instant::now() + delay,
                    delay,
                    failures,
                    last_error: err,
                });
            }
        }
    }

    fn accept_failed(&self, e: &std::io::Error, errors: &mut RateLimited) {
        if let Some(n) = errors.hit(Instant::now()) {
            self.log(
                4,
                &format!(
                    "metrics: accept failed: {e} ({n} failure(s) since the last report); \
                     pausing {} ms, the listener stays",
                    ACCEPT_PAUSE.as_millis()
                ),
            );
        }
    }

    /// Log (rate-limited) that the connection cap was reached.
    fn cap_reached(&self, what: &str) {
        let due = self
            .full
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hit(Instant::now());
        if let Some(n) = due {
            self.log(
                4,
                &format!(
                    "metrics: {} connections open ({n} time(s) since the last report); {what}",
                    self.limits.max_connections
                ),
            );
        }
    }

    /// Take a connection slot for `stream` (closing an idle connection if need be) and
    /// serve it; with no slot to be had it is closed at once (dropped).
    async fn admit(&self, stream: TcpStream) {
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let now = Instant::now();
                if !lock(&self.conns).evict_one(now, self.limits.stalled_after) {
                    self.cap_reached("none idle: new connections are closed at once");
                    return;
                }
                self.cap_reached("the oldest idle ones are closed to make room");
                // The evicted task gives its slot back when the runtime drops it, which
                // happens while this waits.
                match timeout(Duration::from_secs(1), self.slots.clone().acquire_owned()).await {
                    Ok(Ok(p)) => p,
                    _ => return,
                }
            }
        };
        let id = {
            let mut c = lock(&self.conns);
            c.next_id += 1;
            let id = c.next_id;
            c.open.insert(
                id,
                Conn {
                    abort: None,
                    opened: Instant::now(),
                    last_request: None,
                },
            );
            id
        };
        let guard = ConnGuard {
            id,
            conns: self.conns.clone(),
        };
        let task = tokio::spawn(serve_connection(
            stream,
            guard,
            self.page.clone(),
            self.limits,
            permit,
            self.draining.clone(),
        ));
        if let Some(c) = lock(&self.conns).open.get_mut(&id) {
            c.abort = Some(task.abort_handle());
        }
    }
}

fn respond(status: StatusCode, body: Bytes, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The one route: `GET /metrics`; other paths 404, other methods 405.
fn route(req: &Request<Incoming>, page: &Page) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => respond(StatusCode::OK, page.get(), CONTENT_TYPE_TEXT),
        (&Method::GET, _) => respond(
            StatusCode::NOT_FOUND,
            Bytes::from_static(b"not found\n"),
            "text/plain; charset=utf-8",
        ),
        _ => {
            let mut r = respond(
                StatusCode::METHOD_NOT_ALLOWED,
                Bytes::from_static(b"method not allowed\n"),
                "text/plain; charset=utf-8",
            );
            r.headers_mut()
                .insert(hyper::header::ALLOW, HeaderValue::from_static("GET"));
            r
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    guard: ConnGuard,
    page: Arc<Page>,
    limits: Limits,
    _permit: OwnedSemaphorePermit,
    mut draining: watch::Receiver<bool>,
) {
    let (id, conns) = (guard.id, guard.conns.clone());
    let svc = service_fn(move |req: Request<Incoming>| {
        if let Some(c) = lock(&conns).open.get_mut(&id) {
            c.last_request = Some(Instant::now());
        }
        let resp = route(&req, &page);
        async move { Ok::<_, Infallible>(resp) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEAD_BYTES)
        .header_read_timeout(limits.header_read_timeout);
    let conn = builder.serve_connection(TokioIo::new(stream), svc);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = sleep(limits.connection_deadline) => {}
        // A reexec: the request in progress is answered, then the connection closes.
        _ = draining.wait_for(|d| *d) => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = timeout(limits.close_grace, conn).await;
    drop(guard);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    type Lines = Arc<Mutex<Vec<String>>>;

    fn server(addr: &str) -> (HttpServer, Lines) {
        server_with(addr, Limits::default(), 5)
    }

    /// A server whose page is `body_len` bytes.
    fn server_with(addr: &str, limits: Limits, body_len: usize) -> (HttpServer, Lines) {
        let lines = Arc::new(Mutex::new(Vec::new()));
        let l = lines.clone();
        let page: Vec<u8> = b"up 1\n".iter().copied().cycle().take(body_len).collect();
        let s = HttpServer::start_with(
            addr.parse().unwrap(),
            Arc::new(move || page.clone()),
            Arc::new(move |_, m: &str| l.lock().unwrap().push(m.to_string())),
            limits,
        )
        .unwrap();
        (s, lines)
    }

    fn poll_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let end = std::time::Instant::now() + limit;
        while std::time::Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        f()
    }

    /// A client with a tiny receive buffer that pipelines `n` scrapes and never reads.
    fn non_reader(addr: SocketAddr, n: usize) -> socket2::Socket {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.set_recv_buffer_size(4096).unwrap();
        s.connect(&addr.into()).unwrap();
        let req = "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n".repeat(n);
        (&s).write_all(req.as_bytes()).unwrap();
        s
    }

    fn get(addr: SocketAddr, req: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn routes_and_content_type() {
        let (s, _) = server("127.0.0.1:0");
        let a = s.addr().unwrap();
        let ok = get(a, "GET /metrics HTTP/1.0\r\n\r\n");
        assert!(ok.starts_with("HTTP/1.0 200"), "{ok}");
        assert!(
            ok.contains("content-type: text/plain; version=0.0.4"),
            "{ok}"
        );
        assert!(ok.ends_with("up 1\n"));
        assert!(get(a, "GET /x HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 404"));
        assert!(get(a, "POST /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 405"));
    }

    #[test]
    fn a_large_page_is_sent_whole() {
        let (s, _) = server_with("127.0.0.1:0", Limits::default(), 500 << 10);
        let r = get(s.addr().unwrap(), "GET /metrics HTTP/1.0\r\n\r\n");
        assert!(r.starts_with("HTTP/1.0 200"));
        assert!(
            r.contains(&format!("content-length: {}\r\n", 500 << 10)),
            "{}",
            &r[..200]
        );
        assert_eq!(r.split_once("\r\n\r\n").unwrap().1.len(), 500 << 10);
    }

    #[test]
    fn an_oversized_head_is_refused() {
        let (s, _) = server("127.0.0.1:0");
        let big = format!("GET /metrics HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(9000));
        let r = get(s.addr().unwrap(), &big);
        assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    }

    #[test]
    fn idle_connections_make_room_for_a_scrape() {
        let (s, _) = server("127.0.0.1:0");
        let a = s.addr().unwrap();
        let idle: Vec<_> = (0..MAX_CONNECTIONS * 3)
            .map(|_| std::net::TcpStream::connect(a).unwrap())
            .collect();
        let t = std::time::Instant::now();
        assert!(get(a, "GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 200"));
        assert!(t.elapsed() < HEADER_READ_TIMEOUT);
        drop(idle);
    }

    #[test]
    fn a_taken_port_is_retried_and_the_address_can_move() {
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = holder.local_addr().unwrap();
        let (s, lines) = server(&taken.to_string());
        assert_eq!(s.addr(), None);
        assert!(lines.lock().unwrap()[0].contains("cannot listen on"));
        drop(holder);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while s.addr().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(s.addr(), Some(taken));
        s.address_handle().set("127.0.0.1:0".parse().unwrap());
        while s.addr() == Some(taken) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let new = s.addr().unwrap();
        assert_ne!(new, taken);
        assert!(get(new, "GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 200"));
        assert!(std::net::TcpStream::connect(taken).is_err());
    }

    #[test]
    fn a_slow_head_is_cut_at_the_header_read_timeout() {
        let limits = Limits {
            header_read_timeout: Duration::from_secs(1),
            ..Limits::default()
        };
        let (s, _) = server_with("127.0.0.1:0", limits, 5);
        let mut c = std::net::TcpStream::connect(s.addr().unwrap()).unwrap();
        let t = std::time::Instant::now();
        let mut closed = false;
        for b in b"GET /metrics HTTP/1.1\r\nX: ".iter().cycle().take(400) {
            if c.write_all(&[*b]).is_err() {
                closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(closed || poll_until(Duration::from_secs(2), || s.connections() == 0));
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(900), "closed after {took:?}");
        assert!(took < Duration::from_secs(4), "closed after {took:?}");
    }

    #[test]
    fn a_client_that_never_reads_is_dropped_at_the_deadline() {
        let limits = Limits {
            connection_deadline: Duration::from_secs(1),
            close_grace: Duration::from_secs(1),
            ..Limits::default()
        };
        // 100 pipelined scrapes of 500 KB each: far more than the socket buffers hold.
        let (s, _) = server_with("127.0.0.1:0", limits, 500 << 10);
        let c = non_reader(s.addr().unwrap(), 100);
        assert!(poll_until(Duration::from_secs(2), || s.connections() == 1));
        let t = std::time::Instant::now();
        assert!(poll_until(Duration::from_secs(10), || s.connections() == 0));
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        drop(c);
    }

    #[test]
    fn past_the_cap_with_nothing_idle_a_new_connection_is_closed_at_once() {
        let limits = Limits {
            max_connections: 2,
            stalled_after: Duration::from_secs(600),
            ..Limits::default()
        };
        let (s, lines) = server_with("127.0.0.1:0", limits, 500 << 10);
        let a = s.addr().unwrap();
        let stuck = [non_reader(a, 10), non_reader(a, 10)];
        assert!(poll_until(Duration::from_secs(2), || s.connections() == 2));
        // Both have a request in progress: neither is closed to make room.
        std::thread::sleep(Duration::from_millis(100));
        let t = std::time::Instant::now();
        let r = get(a, "GET /metrics HTTP/1.0\r\n\r\n");
        assert_eq!(r, "", "a third connection was served");
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!(s.connections(), 2);
        assert!(
            lines
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("2 connections open")),
            "{:?}",
            lines.lock().unwrap()
        );
        drop(stuck);
        // Once they are gone a scrape is served again.
        assert!(poll_until(Duration::from_secs(5), || {
            get(a, "GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 200")
        }));
    }

    #[test]
    fn dropping_the_server_does_not_wait_for_stuck_clients() {
        let (s, _) = server_with("127.0.0.1:0", Limits::default(), 500 << 10);
        let a = s.addr().unwrap();
        let stuck: Vec<_> = (0..8).map(|_| non_reader(a, 20)).collect();
        assert!(poll_until(Duration::from_secs(2), || s.connections() == 8));
        let t = std::time::Instant::now();
        drop(s);
        // Not the 30 s connection deadline.
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        drop(stuck);
    }

    /// A client that pipelines requests and reads the answers without end; its threads
    /// stop once the server closes the connection.
    fn hog(addr: SocketAddr) -> std::net::TcpStream {
        let s = std::net::TcpStream::connect(addr).unwrap();
        let (mut w, mut r) = (s.try_clone().unwrap(), s.try_clone().unwrap());
        std::thread::spawn(move || {
            while w
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .is_ok()
            {}
        });
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while r.read(&mut buf).is_ok_and(|n| n > 0) {}
        });
        s
    }

    #[test]
    fn clients_that_keep_the_server_busy_make_room_after_a_while() {
        let limits = Limits {
            max_connections: 2,
            stalled_after: Duration::from_secs(1),
            ..Limits::default()
        };
        let (s, _) = server_with("127.0.0.1:0", limits, 5000);
        let a = s.addr().unwrap();
        let hogs = [hog(a), hog(a)];
        assert!(poll_until(Duration::from_secs(2), || s.connections() == 2));
        // Both are being served.
        assert!(poll_until(Duration::from_secs(2), || {
            lock(&s.conns)
                .open
                .values()
                .all(|c| c.last_request.is_some())
        }));
        let t = std::time::Instant::now();
        assert!(poll_until(Duration::from_secs(10), || {
            get(a, "GET /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.0 200")
        }));
        let took = t.elapsed();
        assert!(took < Duration::from_secs(5), "{took:?}");
        for h in hogs {
            let _ = h.shutdown(std::net::Shutdown::Both);
        }
    }
}
