//! Spawning off the event loop: a small fixed pool of spawner threads that run any
//! [`Spawner`] and answer with [`Event::Spawned`] on the loop's event channel.
//!
//! A spawn costs milliseconds of wall time (`posix_spawn` waits for the child's exec; on
//! cgroup v1 the cgroup placement may wait for an RCU grace period), so a fleet starting
//! thousands of VMs would otherwise hold reaping and signals for seconds.
//!
//! The threads end only when the supervisor drops its end of the job channel (after
//! every child is gone). `run-vm` does not set PR_SET_PDEATHSIG (it fires when the
//! *thread* that forked the child exits, so a re-exec, which ends every thread, would
//! kill every VM): a child learns that its supervisor is gone from EOF on its control
//! channel, whichever thread forked it.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use super::Event;
use super::cgroup::Placement;
use super::output::{Limits, OutputHub};
use super::spawn::{Child, SpawnRequest, Spawner};
use crate::config::{VmSpec, VmUser};

/// One spawn, with everything it needs owned (it crosses to a spawner thread).
pub struct Job {
    /// Which request of the VM this is (a late answer to an older one is told apart).
    pub ticket: u64,
    /// The VM.
    pub spec: VmSpec,
    /// See [`SpawnRequest::settings`].
    pub settings: Option<PathBuf>,
    /// See [`SpawnRequest::log_dir`].
    pub log_dir: PathBuf,
    /// A copy of the VM's counter table fd (closed once the child has it).
    pub counters: Option<OwnedFd>,
    /// See [`SpawnRequest::user`].
    pub user: Option<VmUser>,
    /// See [`SpawnRequest::output`].
    pub output: Option<(Arc<OutputHub>, Limits)>,
    /// See [`SpawnRequest::cgroup`].
    pub cgroup: Option<Placement>,
    /// See [`SpawnRequest::seccomp`].
    pub seccomp: bool,
}

impl Job {
    fn run<S: Spawner>(&self, spawner: &mut S) -> io::Result<Child> {
        let req = SpawnRequest {
            spec: &self.spec,
            settings: self.settings.as_deref(),
            log_dir: &self.log_dir,
            counters: self.counters.as_ref().map(AsFd::as_fd),
            user: self.user.as_ref(),
            output: self.output.as_ref().map(|(o, l)| (&**o, *l)),
            cgroup: self.cgroup.as_ref(),
            seccomp: self.seccomp,
        };
        spawner.spawn(&req)
    }
}

/// A spawner thread's answer.
pub struct Done {
    /// The VM.
    pub name: String,
    /// The job's ticket.
    pub ticket: u64,
    /// The spec it was started with.
    pub spec: VmSpec,
    /// The child, or why there is none.
    pub result: io::Result<Child>,
}

/// The pool's handle: jobs go in, [`Event::Spawned`] comes back on the event channel.
pub struct Pool {
    jobs: Sender<Job>,
    /// Set when the fleet stops: queued jobs are answered "cancelled", not started.
    cancelled: Arc<AtomicBool>,
}

impl Pool {
    /// Start `threads` threads (at least one), each with its own copy of `spawner`.
    pub fn start<S: Spawner + Clone + Send + 'static>(
        spawner: &S,
        threads: usize,
        events: &Sender<Event>,
    ) -> io::Result<Self> {
        let (jobs, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let cancelled = Arc::new(AtomicBool::new(false));
        for i in 0..threads.max(1) {
            let (rx, events, mut spawner) = (rx.clone(), events.clone(), spawner.clone());
            let cancelled = cancelled.clone();
            std::thread::Builder::new()
                .name(format!("spawner-{i}"))
                .spawn(move || worker(&rx, &events, &mut spawner, &cancelled))?;
        }
        Ok(Pool { jobs, cancelled })
    }

    /// The fleet stops: jobs not started yet are answered with an error instead.
    pub fn cancel_queued(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }

    /// Queue `job`; gives it back if every thread is gone.
    pub fn submit(&self, job: Job) -> Result<(), Box<Job>> {
        self.jobs.send(job).map_err(|e| Box::new(e.0))
    }
}

fn worker<S: Spawner>(
    rx: &Mutex<Receiver<Job>>,
    events: &Sender<Event>,
    spawner: &mut S,
    cancelled: &AtomicBool,
) {
    loop {
        let job = {
            let rx = rx.lock().unwrap_or_else(|p| p.into_inner());
            match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            }
        };
        let result = if cancelled.load(Ordering::SeqCst) {
            Err(io::Error::other("cancelled: the fleet stops"))
        } else {
            job.run(spawner)
        };
        let done = Done {
            name: job.spec.name.clone(),
            ticket: job.ticket,
            spec: job.spec,
            result,
        };
        if let Err(e) = events.send(Event::Spawned(Box::new(done)))
            && let Event::Spawned(done) = e.0
            && let Ok(child) = done.result
        {
            // No loop to hear of it: the child must not run unsupervised.
            let _ = spawner.signal(child.pid, nix::sys::signal::Signal::SIGKILL);
        }
    }
}
