//! One instance's life as a pure state machine: [`Machine::step`] takes an event
//! (from the shim, a health watcher, a timer or a request), the time and the
//! instance's resolved [`Policy`], changes the state, and returns the effects for
//! the actor to carry out (commands to the shim, a save, an event to publish, a
//! timer). Nothing else writes an instance's state, and nothing here does I/O, so
//! every restart, backoff, arming, stop and health rule has a table test below.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use paddock_wire::kinds;

use crate::shim_proto::{ExitInfo, ShimCommand};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Starting,
    Up,
    Backoff,
    Crashed,
    Stopping,
    Stopped,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Up => "up",
            State::Backoff => "backoff",
            State::Crashed => "crashed",
            State::Stopping => "stopping",
            State::Stopped => "stopped",
        }
    }
}

/// The instance's rules, its request's values with the runner's defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// At most `limit` restarts within `window`, else `crashed`.
    pub limit: u32,
    pub window: Duration,
    /// Backoff after the first (immediate) restart: base, doubling, capped.
    pub base: Duration,
    pub cap: Duration,
    /// A run at least this long resets the backoff.
    pub reset: Duration,
    /// Exit codes that are a normal end (no restart).
    pub normal_exit: Vec<i32>,
    pub stop_signal: i32,
    pub stop_grace_ms: u64,
}

/// The two clocks a step needs: monotonic for windows and delays, the wall clock
/// for what is recorded (epoch ms).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall_ms: i64,
}

impl Now {
    pub fn current() -> Now {
        Now {
            mono: Instant::now(),
            wall_ms: paddock_wire::now_ms(),
        }
    }
}

/// What to do once the shim reports `Stopped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterStop {
    /// `instance.stop`: stay stopped, the shim exits.
    Remove,
    /// `instance.restart` or a failed health check: start again.
    Start,
    /// Health failed past the respawn limit: stay down as `crashed`.
    Crash,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A runner found the instance's directory at start (`shim_alive`: its shim
    /// still runs).
    Adopted {
        shim_alive: bool,
    },
    /// The shim's first line on a connection. `stop_sent`: this connection
    /// already carried a `Stop`.
    Hello {
        pid: Option<i32>,
        started_ms: Option<i64>,
        last_exit: Option<ExitInfo>,
        stop_sent: bool,
    },
    /// The shim exec'd the app.
    Started {
        pid: i32,
        started_ms: i64,
    },
    Exited(ExitInfo),
    /// After a `Stop`: the app and everything it started are gone.
    Stopped,
    /// The shim's connection closed; `shim_alive`: the shim process still runs.
    ShimGone {
        shim_alive: bool,
    },
    /// The shim could not be started at all.
    ShimUnstartable {
        reason: String,
    },
    Healthy {
        generation: u64,
    },
    Unhealthy {
        generation: u64,
        reason: String,
    },
    /// Timer: a backoff delay has passed.
    BackoffOver {
        generation: u64,
    },
    /// Timer: the app has been up for the reset time.
    StableRun {
        generation: u64,
    },
    StopAsked {
        shim_alive: bool,
    },
    RestartAsked {
        shim_alive: bool,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// A command to the shim (queued until it is connected).
    Send(ShimCommand),
    /// Write the record (the persisted fields changed).
    Save,
    /// Publish the instance's info under this kind.
    Publish(&'static str),
    /// Watch the app's health for this generation.
    WatchHealth {
        generation: u64,
    },
    /// Step `event` after `delay`.
    After {
        delay: Duration,
        event: Box<Event>,
    },
    SpawnShim,
    /// Connect to the running shim's socket again.
    Connect,
    /// Drop the commands queued for a shim that is gone.
    ForgetPending,
    /// Kill everything in the instance's cgroup.
    KillCgroup,
    /// Remove the instance's (empty) cgroups.
    RemoveCgroup,
    Info(String),
    Warn(String),
}

/// An instance's state. The persisted part (`running`, `restarts`, `crashed`,
/// `stopped_at`) goes into the record on [`Effect::Save`].
#[derive(Debug, Clone)]
pub struct Machine {
    pub state: State,
    pub pid: Option<i32>,
    pub started_ms: Option<i64>,
    pub last_exit: Option<ExitInfo>,
    pub reason: Option<String>,
    /// Bumped at every app start, exit and stop: health results, watchers and
    /// timers of an older generation stand down.
    pub generation: u64,
    pub running: bool,
    pub restarts: u32,
    pub crashed: Option<String>,
    pub stopped_at: Option<i64>,
    /// When the current run's health check first passed (epoch ms); None while
    /// not up.
    pub up_at: Option<i64>,
    /// Restart times inside the respawn window.
    recent: VecDeque<Instant>,
    next_delay: Duration,
    /// Whether the shim is armed to restart on its own (None: unknown).
    armed: Option<bool>,
    after_stop: Option<AfterStop>,
}

impl Machine {
    /// A new instance, or one read from its record.
    pub fn new(
        running: bool,
        restarts: u32,
        crashed: Option<String>,
        stopped_at: Option<i64>,
    ) -> Machine {
        Machine {
            state: State::Starting,
            pid: None,
            started_ms: None,
            last_exit: None,
            reason: None,
            generation: 0,
            running,
            restarts,
            crashed,
            stopped_at,
            up_at: None,
            recent: VecDeque::new(),
            next_delay: Duration::ZERO,
            armed: None,
            after_stop: None,
        }
    }

    pub fn step(&mut self, ev: Event, now: Now, p: &Policy) -> Vec<Effect> {
        let fx = self.transition(ev, now, p);
        // `up_at` belongs to the current run's first passing check: gone as soon
        // as the instance is not up (a new run earns its own).
        if self.state != State::Up {
            self.up_at = None;
        }
        fx
    }

    fn transition(&mut self, ev: Event, now: Now, p: &Policy) -> Vec<Effect> {
        let mut fx = Vec::new();
        match ev {
            Event::Adopted { shim_alive } => self.adopted(shim_alive, now, p, &mut fx),
            Event::Hello {
                pid,
                started_ms,
                last_exit,
                stop_sent,
            } => self.hello(pid, started_ms, last_exit, stop_sent, now, p, &mut fx),
            Event::Started { pid, started_ms } => {
                self.pid = Some(pid);
                self.started_ms = Some(started_ms);
                fx.push(Effect::Info(format!("started pid {pid}")));
                if self.state != State::Stopping {
                    // (A stop is in flight otherwise; the new process goes with it.)
                    self.state = State::Starting;
                    self.generation += 1;
                    self.rearm(now, p, &mut fx);
                    fx.push(Effect::WatchHealth {
                        generation: self.generation,
                    });
                }
            }
            Event::Exited(e) => self.exited(e, now, p, &mut fx),
            Event::Stopped => self.stopped(now, &mut fx),
            Event::ShimGone { shim_alive } => {
                // Whatever the shim was armed with went with the connection's
                // knowledge of it; the next Hello and start say it again.
                self.armed = None;
                if shim_alive && self.state != State::Stopped {
                    // Only the connection broke: connect again; the shim's Hello
                    // brings the runner up to date.
                    fx.push(Effect::Warn("lost the shim's socket; reconnecting".into()));
                    fx.push(Effect::Connect);
                    return fx;
                }
                fx.push(Effect::ForgetPending);
                let stopping = self.after_stop.take();
                if self.state == State::Stopped {
                    // The shim left its cgroups when it exited: now they can go.
                    fx.push(Effect::RemoveCgroup);
                } else if self.state == State::Stopping && stopping == Some(AfterStop::Remove) {
                    // It died while stopping the instance for good: what it held
                    // goes, and the stop is done.
                    fx.push(Effect::KillCgroup);
                    self.generation += 1;
                    self.mark_stopped(now, &mut fx);
                    fx.push(Effect::RemoveCgroup);
                    fx.push(Effect::Warn("shim gone while stopping; stopped".into()));
                } else if self.state == State::Stopping && stopping == Some(AfterStop::Start) {
                    // It died during a restart: a fresh shim carries the restart out.
                    fx.push(Effect::KillCgroup);
                    self.generation += 1;
                    self.pid = None;
                    self.state = State::Starting;
                    self.restarts += 1;
                    fx.push(Effect::Save);
                    fx.push(Effect::Warn(
                        "shim gone during a restart; starting a new one".into(),
                    ));
                    fx.push(Effect::SpawnShim);
                } else {
                    // What the dead shim held goes with it (its cgroup only: the
                    // runner's other descendants are other instances' shims).
                    fx.push(Effect::KillCgroup);
                    self.generation += 1;
                    self.pid = None;
                    self.crash("its paddock-shim ended unexpectedly".into(), &mut fx);
                    fx.push(Effect::Warn("shim gone; instance crashed".into()));
                    fx.push(Effect::Publish(kinds::INSTANCE_CRASHED));
                }
            }
            Event::ShimUnstartable { reason } => {
                self.generation += 1;
                fx.push(Effect::Warn(reason.clone()));
                self.crash(reason, &mut fx);
                fx.push(Effect::Publish(kinds::INSTANCE_CRASHED));
            }
            Event::Healthy { generation } => {
                if generation == self.generation && self.state == State::Starting {
                    self.state = State::Up;
                    self.up_at = Some(now.wall_ms);
                    self.reason = None;
                    fx.push(Effect::After {
                        delay: p.reset,
                        event: Box::new(Event::StableRun { generation }),
                    });
                    self.rearm(now, p, &mut fx);
                    fx.push(Effect::Info("up".into()));
                    fx.push(Effect::Publish(kinds::INSTANCE_UP));
                }
            }
            Event::Unhealthy { generation, reason } => {
                // Only a running instance nobody is stopping is restarted for health.
                if generation != self.generation
                    || !matches!(self.state, State::Starting | State::Up)
                    || self.after_stop.is_some()
                {
                    return fx;
                }
                let then = match self.limit_reached(now, p, &reason) {
                    None => {
                        fx.push(Effect::Warn(format!("health: {reason}; restarting")));
                        self.reason = Some(reason);
                        AfterStop::Start
                    }
                    Some(limit) => {
                        fx.push(Effect::Warn(format!(
                            "health: {reason}; giving up: {limit}"
                        )));
                        self.reason = Some(format!("{limit} (health: {reason})"));
                        AfterStop::Crash
                    }
                };
                self.begin_stop(then, p, &mut fx);
            }
            Event::BackoffOver { generation } => {
                if self.state == State::Backoff && generation == self.generation {
                    self.state = State::Starting;
                    fx.push(Effect::Send(ShimCommand::Start));
                }
            }
            Event::StableRun { generation } => {
                if self.state == State::Up && generation == self.generation {
                    self.next_delay = Duration::ZERO;
                    self.rearm(now, p, &mut fx);
                }
            }
            Event::StopAsked { shim_alive } => {
                if self.state == State::Stopped {
                    return fx;
                }
                // The intent is on disk first: a runner restarted mid-stop finishes it.
                self.running = false;
                fx.push(Effect::Save);
                if shim_alive {
                    self.begin_stop(AfterStop::Remove, p, &mut fx);
                } else {
                    // Nothing left to stop.
                    self.generation += 1;
                    self.mark_stopped(now, &mut fx);
                    fx.push(Effect::RemoveCgroup);
                }
            }
            Event::RestartAsked { shim_alive } => {
                if self.state == State::Stopped || self.stopping_for_good() {
                    return fx; // refused: a stopped instance is not restarted
                }
                self.recent.clear();
                self.next_delay = Duration::ZERO;
                self.reason = None;
                self.crashed = None;
                self.generation += 1;
                if shim_alive {
                    fx.push(Effect::Save);
                    self.begin_stop(AfterStop::Start, p, &mut fx);
                } else {
                    // Its shim died: a fresh shim starts the app.
                    self.after_stop = None;
                    self.armed = None;
                    self.state = State::Starting;
                    self.restarts += 1;
                    fx.push(Effect::Save);
                    fx.push(Effect::SpawnShim);
                }
            }
        }
        fx
    }

    /// An `instance.stop` is under way: nothing may bring the instance back.
    pub fn stopping_for_good(&self) -> bool {
        self.state == State::Stopping && self.after_stop == Some(AfterStop::Remove)
    }

    fn adopted(&mut self, shim_alive: bool, now: Now, p: &Policy, fx: &mut Vec<Effect>) {
        if !self.running {
            if shim_alive {
                // A stop was asked for before the runner went away: finish it.
                self.begin_stop(AfterStop::Remove, p, fx);
                fx.push(Effect::Connect);
            } else {
                self.state = State::Stopped;
                if self.stopped_at.is_none() {
                    // Stopped by an older runner: its keep time starts now.
                    self.stopped_at = Some(now.wall_ms);
                    fx.push(Effect::Save);
                }
                fx.push(Effect::RemoveCgroup);
            }
            return;
        }
        if let Some(reason) = self.crashed.clone() {
            self.state = State::Crashed;
            self.reason = Some(reason);
            if shim_alive {
                fx.push(Effect::Connect);
            }
            return;
        }
        fx.push(Effect::Info(format!(
            "re-adopting instance (shim {})",
            if shim_alive { "alive" } else { "gone" }
        )));
        fx.push(if shim_alive {
            Effect::Connect
        } else {
            Effect::SpawnShim
        });
    }

    #[allow(clippy::too_many_arguments)]
    fn hello(
        &mut self,
        pid: Option<i32>,
        started_ms: Option<i64>,
        last_exit: Option<ExitInfo>,
        stop_sent: bool,
        now: Now,
        p: &Policy,
        fx: &mut Vec<Effect>,
    ) {
        if self.state == State::Stopping {
            // A stop may have been lost with the old connection: ask again (a shim
            // with no app answers `Stopped` at once), unless this connection
            // already carried it.
            if !stop_sent {
                fx.push(Effect::Send(ShimCommand::Stop {
                    sig: p.stop_signal,
                    grace_ms: p.stop_grace_ms,
                }));
            }
            return;
        }
        // A shim says nothing of its arming: after any (re)connection the runner
        // no longer knows it, so the next rearm says it again.
        self.armed = None;
        // The exit this runner already handled is not news.
        let news = last_exit.filter(|e| self.last_exit.as_ref() != Some(e));
        match pid {
            Some(pid) => {
                // It may have ended and been restarted by its armed shim while no
                // runner listened.
                if let Some(e) = news {
                    if e.restarted {
                        self.restarts += 1;
                        fx.push(Effect::Save);
                    }
                    self.last_exit = Some(e);
                }
                self.pid = Some(pid);
                self.started_ms = started_ms;
                if !matches!(self.state, State::Stopped | State::Crashed) {
                    self.state = State::Starting;
                    self.generation += 1;
                    fx.push(Effect::WatchHealth {
                        generation: self.generation,
                    });
                }
            }
            None => {
                if let Some(e) = news {
                    if !matches!(self.state, State::Stopped | State::Crashed) {
                        self.exited(e, now, p, fx);
                    }
                }
            }
        }
    }

    fn exited(&mut self, e: ExitInfo, now: Now, p: &Policy, fx: &mut Vec<Effect>) {
        let uptime = self
            .started_ms
            .map(|st| e.at.saturating_sub(st).max(0) as u64)
            .unwrap_or(0);
        self.pid = None;
        self.started_ms = None;
        self.generation += 1; // stop health checks of the dead process
        self.last_exit = Some(e.clone());
        fx.push(Effect::Info(format!("exited: {}", e.describe())));
        if matches!(self.state, State::Stopping | State::Stopped) || self.after_stop.is_some() {
            return; // asked for; `Stopped` follows
        }
        fx.push(Effect::Publish(kinds::INSTANCE_DOWN));
        if e.code.is_some_and(|c| p.normal_exit.contains(&c)) {
            self.reason = Some(format!("exited normally ({})", e.describe()));
            self.mark_stopped(now, fx);
            fx.push(Effect::Send(ShimCommand::Exit));
            return;
        }
        if Duration::from_millis(uptime) >= p.reset {
            self.next_delay = Duration::ZERO;
        }
        if let Some(reason) = self.limit_reached(now, p, &e.describe()) {
            fx.push(Effect::Warn(format!("crashed: {reason}")));
            if e.restarted {
                // Armed a moment too early: take the new process down again.
                self.reason = Some(reason);
                self.begin_stop(AfterStop::Crash, p, fx);
                return;
            }
            self.crash(reason, fx);
            fx.push(Effect::Publish(kinds::INSTANCE_CRASHED));
            return;
        }
        let delay = self.next_delay;
        self.next_delay = (delay * 2).max(p.base).min(p.cap);
        self.restarts += 1;
        fx.push(Effect::Save);
        if e.restarted {
            // The armed shim already started it again (its `Started` follows).
            self.armed = Some(false);
            self.state = State::Starting;
            return;
        }
        if delay.is_zero() {
            self.state = State::Starting;
            fx.push(Effect::Send(ShimCommand::Start));
        } else {
            self.state = State::Backoff;
            self.reason = Some(format!("restarting in {delay:?} after {}", e.describe()));
            fx.push(Effect::After {
                delay,
                event: Box::new(Event::BackoffOver {
                    generation: self.generation,
                }),
            });
        }
    }

    fn stopped(&mut self, now: Now, fx: &mut Vec<Effect>) {
        if self.state != State::Stopping {
            // An answer to a stop already handled (sent twice across a
            // reconnection): not news.
            return;
        }
        self.pid = None;
        self.generation += 1;
        match self.after_stop.take() {
            Some(AfterStop::Start) => {
                self.restarts += 1;
                self.state = State::Starting;
                fx.push(Effect::Save);
                fx.push(Effect::Send(ShimCommand::Start));
            }
            Some(AfterStop::Crash) => {
                let reason = self.reason.clone().unwrap_or_else(|| "gave up".into());
                self.crash(reason, fx);
                fx.push(Effect::Publish(kinds::INSTANCE_CRASHED));
            }
            Some(AfterStop::Remove) | None => {
                self.mark_stopped(now, fx);
                fx.push(Effect::Send(ShimCommand::Exit));
                fx.push(Effect::RemoveCgroup);
                fx.push(Effect::Info("stopped".into()));
            }
        }
    }

    /// Restarts inside the respawn window (older ones are forgotten).
    fn recent_restarts(&mut self, now: Now, window: Duration) -> u32 {
        while self
            .recent
            .front()
            .is_some_and(|t| now.mono.saturating_duration_since(*t) > window)
        {
            self.recent.pop_front();
        }
        self.recent.len() as u32
    }

    /// Counts a restart against the respawn limit, or, when the limit is reached,
    /// says why the instance is to be `crashed` instead.
    fn limit_reached(&mut self, now: Now, p: &Policy, why: &str) -> Option<String> {
        let used = self.recent_restarts(now, p.window);
        if used >= p.limit {
            return Some(format!(
                "{used} restarts within {:?}; last: {why}",
                p.window
            ));
        }
        self.recent.push_back(now.mono);
        None
    }

    /// Asks the shim to stop the app (stop signal, grace, then everything killed);
    /// `then` says what happens once it reports `Stopped`.
    fn begin_stop(&mut self, then: AfterStop, p: &Policy, fx: &mut Vec<Effect>) {
        self.state = State::Stopping;
        self.after_stop = Some(then);
        self.generation += 1;
        fx.push(Effect::Send(ShimCommand::Stop {
            sig: p.stop_signal,
            grace_ms: p.stop_grace_ms,
        }));
    }

    /// Arms the shim exactly when its next restart would be immediate anyway (no
    /// backoff due, room under the respawn limit, running, nobody stopping it), so
    /// that restart needs no round trip to the runner.
    fn rearm(&mut self, now: Now, p: &Policy, fx: &mut Vec<Effect>) {
        let want = matches!(self.state, State::Starting | State::Up)
            && self.after_stop.is_none()
            && self.next_delay.is_zero()
            && self.recent_restarts(now, p.window) < p.limit;
        if self.armed == Some(want) {
            return;
        }
        self.armed = Some(want);
        fx.push(Effect::Send(if want {
            ShimCommand::Arm {
                normal_exit: p.normal_exit.clone(),
            }
        } else {
            ShimCommand::Disarm
        }));
    }

    fn crash(&mut self, reason: String, fx: &mut Vec<Effect>) {
        // No stop is under way any more: later exits and health are handled.
        self.after_stop = None;
        self.state = State::Crashed;
        self.reason = Some(reason.clone());
        self.crashed = Some(reason);
        fx.push(Effect::Save);
    }

    /// Stopped for good: recorded, with the time its directories become removable.
    fn mark_stopped(&mut self, now: Now, fx: &mut Vec<Effect>) {
        self.state = State::Stopped;
        self.pid = None;
        self.running = false;
        self.stopped_at = Some(now.wall_ms);
        fx.push(Effect::Save);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            limit: 3,
            window: Duration::from_secs(60),
            base: Duration::from_millis(100),
            cap: Duration::from_millis(400),
            reset: Duration::from_secs(30),
            normal_exit: vec![0],
            stop_signal: 15,
            stop_grace_ms: 5000,
        }
    }

    /// A clock that starts at a fixed point and is moved by hand.
    struct Clock {
        base: Instant,
        ms: u64,
    }

    impl Clock {
        fn new() -> Clock {
            Clock {
                base: Instant::now(),
                ms: 0,
            }
        }
        fn now(&self) -> Now {
            Now {
                mono: self.base + Duration::from_millis(self.ms),
                wall_ms: 1_700_000_000_000 + self.ms as i64,
            }
        }
        fn advance(&mut self, ms: u64) {
            self.ms += ms;
        }
    }

    fn exit(code: Option<i32>, signal: Option<i32>, at: i64) -> ExitInfo {
        ExitInfo {
            pid: 100,
            code,
            signal,
            oom: false,
            at,
            restarted: false,
        }
    }

    /// A machine whose app has just been started and found healthy.
    fn up(c: &Clock) -> Machine {
        let p = policy();
        let mut m = Machine::new(true, 0, None, None);
        m.step(
            Event::Started {
                pid: 100,
                started_ms: c.now().wall_ms,
            },
            c.now(),
            &p,
        );
        let g = m.generation;
        m.step(Event::Healthy { generation: g }, c.now(), &p);
        assert_eq!(m.state, State::Up);
        m
    }

    #[test]
    fn up_at_is_the_first_passing_check_of_the_current_run() {
        let mut c = Clock::new();
        let p = Policy {
            limit: 10,
            ..policy()
        };
        let mut m = Machine::new(true, 0, None, None);
        m.step(
            Event::Started {
                pid: 100,
                started_ms: c.now().wall_ms,
            },
            c.now(),
            &p,
        );
        assert_eq!(m.up_at, None, "not before health passes");
        c.advance(700);
        let g = m.generation;
        m.step(Event::Healthy { generation: g }, c.now(), &p);
        let first = c.now().wall_ms;
        assert_eq!(m.up_at, Some(first));
        // Later passes of the same run (a stale report too) keep the first.
        c.advance(500);
        m.step(Event::Healthy { generation: g }, c.now(), &p);
        m.step(Event::StableRun { generation: g }, c.now(), &p);
        assert_eq!(m.up_at, Some(first));
        // The app ends: not up, no up_at; the next run earns its own.
        m.step(Event::Exited(exit(Some(1), None, first + 500)), c.now(), &p);
        assert_eq!(m.up_at, None);
        m.step(
            Event::Started {
                pid: 101,
                started_ms: c.now().wall_ms,
            },
            c.now(),
            &p,
        );
        assert_eq!(m.up_at, None);
        c.advance(300);
        let g = m.generation;
        m.step(Event::Healthy { generation: g }, c.now(), &p);
        assert_eq!(m.up_at, Some(c.now().wall_ms));
        // A stop clears it at once (stopping is not up).
        m.step(Event::StopAsked { shim_alive: true }, c.now(), &p);
        assert_eq!(m.up_at, None);
    }

    fn sends(fx: &[Effect]) -> Vec<ShimCommand> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Send(c) => Some(c.clone()),
                _ => None,
            })
            .collect()
    }

    fn timer(fx: &[Effect]) -> Option<(Duration, Event)> {
        fx.iter().find_map(|e| match e {
            Effect::After { delay, event } => Some((*delay, (**event).clone())),
            _ => None,
        })
    }

    #[test]
    fn a_start_watches_health_and_arms_the_shim_then_healthy_is_up_and_published() {
        let c = Clock::new();
        let p = policy();
        let mut m = Machine::new(true, 0, None, None);
        let fx = m.step(
            Event::Started {
                pid: 7,
                started_ms: 1,
            },
            c.now(),
            &p,
        );
        assert_eq!(m.state, State::Starting);
        assert_eq!(m.pid, Some(7));
        assert_eq!(
            sends(&fx),
            vec![ShimCommand::Arm {
                normal_exit: vec![0]
            }]
        );
        assert!(fx.contains(&Effect::WatchHealth {
            generation: m.generation
        }));
        let fx = m.step(
            Event::Healthy {
                generation: m.generation,
            },
            c.now(),
            &p,
        );
        assert_eq!(m.state, State::Up);
        assert!(fx.contains(&Effect::Publish(kinds::INSTANCE_UP)));
        // Already armed: no second Arm.
        assert!(sends(&fx).is_empty());
        let (delay, ev) = timer(&fx).unwrap();
        assert_eq!(delay, p.reset);
        assert_eq!(
            ev,
            Event::StableRun {
                generation: m.generation
            }
        );
    }

    #[test]
    fn a_stale_health_result_is_ignored() {
        let c = Clock::new();
        let p = policy();
        let mut m = up(&c);
        let old = m.generation;
        m.step(Event::Exited(exit(None, Some(9), 0)), c.now(), &p);
        let before = m.clone();
        for ev in [
            Event::Healthy { generation: old },
            Event::Unhealthy {
                generation: old,
                reason: "late".into(),
            },
        ] {
            assert!(m.step(ev, c.now(), &p).is_empty());
            assert_eq!(m.state, before.state);
        }
    }

    #[test]
    fn the_first_restart_is_immediate_then_backoff_doubles_to_its_cap() {
        let mut c = Clock::new();
        let p = policy();
        let p = Policy { limit: 10, ..p };
        let mut m = up(&c);
        let mut delays = Vec::new();
        for _ in 0..5 {
            let fx = m.step(
                Event::Exited(exit(Some(1), None, c.now().wall_ms)),
                c.now(),
                &p,
            );
            assert!(fx.contains(&Effect::Publish(kinds::INSTANCE_DOWN)));
            assert!(fx.contains(&Effect::Save));
            match timer(&fx) {
                None => {
                    assert_eq!(m.state, State::Starting);
                    assert_eq!(sends(&fx), vec![ShimCommand::Start]);
                    delays.push(0);
                }
                Some((d, ev)) => {
                    assert_eq!(m.state, State::Backoff);
                    assert!(sends(&fx).is_empty(), "no start before the delay");
                    delays.push(d.as_millis() as u64);
                    c.advance(d.as_millis() as u64);
                    let fx = m.step(ev, c.now(), &p);
                    assert_eq!(sends(&fx), vec![ShimCommand::Start]);
                    assert_eq!(m.state, State::Starting);
                }
            }
            m.step(
                Event::Started {
                    pid: 101,
                    started_ms: c.now().wall_ms,
                },
                c.now(),
                &p,
            );
        }
        assert_eq!(delays, vec![0, 100, 200, 400, 400]);
        assert_eq!(m.restarts, 5);
    }

    #[test]
    fn a_backoff_timer_of_an_older_generation_starts_nothing() {
        let c = Clock::new();
        let p = policy();
        let mut m = up(&c);
        m.step(Event::Exited(exit(Some(1), None, 0)), c.now(), &p);
        m.step(
            Event::Started {
                pid: 2,
                started_ms: 0,
            },
            c.now(),
            &p,
        );
        let fx = m.step(Event::Exited(exit(Some(1), None, 0)), c.now(), &p);
        let (_, ev) = timer(&fx).unwrap();
        // A restart request in the meantime moves the generation on.
        m.step(Event::RestartAsked { shim_alive: true }, c.now(), &p);
        let state = m.state;
        assert!(m.step(ev, c.now(), &p).is_empty());
        assert_eq!(m.state, state);
    }

    #[test]
    fn the_respawn_limit_crashes_and_publishes_and_the_window_forgets_old_restarts() {
        let mut c = Clock::new();
        let p = Policy {
            base: Duration::ZERO,
            cap: Duration::ZERO,
            ..policy()
        };
        let mut m = up(&c);
        for _ in 0..3 {
            m.step(Event::Exited(exit(Some(1), None, 0)), c.now(), &p);
            assert_eq!(m.state, State::Starting);
        }
        // Past the window, the three old restarts no longer count.
        c.advance(61_000);
        m.step(Event::Exited(exit(Some(1), None, 0)), c.now(), &p);
        assert_eq!(m.state, State::Starting);
        m.step(Event::Exited(exit(Some(1), None, 0)), c.now(), &p);
        m.step(Event::Exited(exit(Some(1), None, 0)), c.now(), &p);
        let fx = m.step(Event::Exited(exit(Some(4), None, 0)), c.now(), &p);
        assert_eq!(m.state, State::Crashed);
        assert!(fx.contains(&Effect::Publish(kinds::INSTANCE_CRASHED)));
        assert!(fx.contains(&Effect::Save));
        let why = m.crashed.clone().unwrap();
        assert!(
            why.contains("3 restarts") && why.contains("exit code 4"),
            "{why}"
        );
        assert!(sends(&fx).is_empty(), "nothing started");
    }

    #[test]
    fn a_normal_exit_stops_without_a_restart() {
        let c = Clock::new();
        let p = policy();
        let mut m = up(&c);
        let fx = m.step(Event::Exited(exit(Some(0), None, 0)), c.now(), &p);
        assert_eq!(m.state, State::Stopped);
        assert!(!m.running);
        assert_eq!(m.stopped_at, Some(c.now().wall_ms));
        assert_eq!(sends(&fx), vec![ShimCommand::Exit]);
        assert_eq!(m.restarts, 0);
        // A signal is never a normal exit, whatever the list says.
        let mut m = up(&c);
        m.step(Event::Exited(exit(None, Some(15), 0)), c.now(), &p);
        assert_eq!(m.state, State::Starting);
    }

    #[test]
    fn a_long_run_resets_the_backoff() {
        let mut c = Clock::new();
        let p = Policy {
            limit: 10,
            ..policy()
        };
        let mut m = up(&c);
        m.step(Event::Exited(exit(Some(1), None, 0)), c.now(), &p);
        m.step(
            Event::Started {
                pid: 2,
                started_ms: c.now().wall_ms,
            },
            c.now(),
            &p,
        );
        let fx = m.step(
            Event::Exited(exit(Some(1), None, c.now().wall_ms)),
            c.now(),
            &p,
        );
        assert_eq!(timer(&fx).unwrap().0, Duration::from_millis(100));
        c.advance(100);
        m.step(
            Event::BackoffOver {
                generation: m.generation,
            },
            c.now(),
            &p,
        );
        m.step(
            Event::Started {
                pid: 3,
                started_ms: c.now().wall_ms,
            },
            c.now(),
            &p,
        );
        // Up for the reset time: the next exit restarts at once again.
        c.advance(30_000);
        let fx = m.step(
            Event::Exited(exit(Some(1), None, c.now().wall_ms)),
            c.now(),
            &p,
        );
        assert!(timer(&fx).is_none());
        assert_eq!(sends(&fx), vec![ShimCommand::Start]);
    }

    #[test]
    fn the_shim_is_armed_only_while_the_next_restart_would_be_immediate() {
        let mut c = Clock::new();
        let p = Policy {
            limit: 10,
            ..policy()
        };
        let mut m = up(&c);
        // Armed by the start. An armed exit: the shim restarted it already.
        let mut e = exit(Some(1), None, 0);
        e.restarted = true;
        let fx = m.step(Event::Exited(e), c.now(), &p);
        assert!(sends(&fx).is_empty(), "no Start: the shim did it");
        assert_eq!(m.restarts, 1);
        // The shim disarms itself after one use, and the next restart has a
        // backoff due: nothing is armed by the new start or by health.
        let fx = m.step(
            Event::Started {
                pid: 2,
                started_ms: 0,
            },
            c.now(),
            &p,
        );
        assert!(sends(&fx).is_empty(), "{fx:?}");
        let g = m.generation;
        let fx = m.step(Event::Healthy { generation: g }, c.now(), &p);
        assert!(sends(&fx).is_empty(), "{fx:?}");
        // A stable run clears the backoff: armed again.
        c.advance(30_000);
        let fx = m.step(Event::StableRun { generation: g }, c.now(), &p);
        assert_eq!(
            sends(&fx),
            vec![ShimCommand::Arm {
                normal_exit: vec![0]
            }]
        );
        // With no backoff but the respawn limit used up, it is disarmed.
        let p1 = Policy {
            limit: 1,
            base: Duration::ZERO,
            cap: Duration::ZERO,
            ..p
        };
        let mut m = up(&c);
        m.step(Event::Exited(exit(Some(1), None, 0)), c.now(), &p1);
        let fx = m.step(
            Event::Started {
                pid: 3,
                started_ms: 0,
            },
            c.now(),
            &p1,
        );
        assert_eq!(sends(&fx), vec![ShimCommand::Disarm], "{fx:?}");
    }

    #[test]
    fn an_armed_restart_past_the_limit_is_taken_down_again() {
        let c = Clock::new();
        let p = Policy {
            limit: 0,
            ..policy()
        };
        let mut m = up(&c);
        let mut e = exit(Some(1), None, 0);
        e.restarted = true;
        let fx = m.step(Event::Exited(e), c.now(), &p);
        assert_eq!(m.state, State::Stopping);
        assert_eq!(
            sends(&fx),
            vec![ShimCommand::Stop {
                sig: 15,
                grace_ms: 5000
            }]
        );
        let fx = m.step(Event::Stopped, c.now(), &p);
        assert_eq!(m.state, State::Crashed);
        assert!(fx.contains(&Effect::Publish(kinds::INSTANCE_CRASHED)));
    }

    #[test]
    fn stop_saves_the_intent_first_then_stops_and_the_shim_exits() {
        let c = Clock::new();
        let p = policy();
        let mut m = up(&c);
        let fx = m.step(Event::StopAsked { shim_alive: true }, c.now(), &p);
        assert_eq!(fx[0], Effect::Save);
        assert!(!m.running);
        assert_eq!(m.state, State::Stopping);
        assert_eq!(
            sends(&fx),
            vec![ShimCommand::Stop {
                sig: 15,
                grace_ms: 5000
            }]
        );
        // The app's exit during a stop is no crash and starts nothing.
        let fx = m.step(Event::Exited(exit(None, Some(15), 0)), c.now(), &p);
        assert!(!fx.contains(&Effect::Publish(kinds::INSTANCE_DOWN)));
        assert!(sends(&fx).is_empty());
        let fx = m.step(Event::Stopped, c.now(), &p);
        assert_eq!(m.state, State::Stopped);
        assert_eq!(sends(&fx), vec![ShimCommand::Exit]);
        assert!(fx.contains(&Effect::RemoveCgroup));
        // A second Stopped (sent twice across a reconnection) is not news.
        assert!(m.step(Event::Stopped, c.now(), &p).is_empty());
        // Stopping a stopped instance does nothing.
        assert!(m
            .step(Event::StopAsked { shim_alive: false }, c.now(), &p)
            .is_empty());
    }

    #[test]
    fn stop_with_a_dead_shim_is_stopped_at_once() {
        let c = Clock::new();
        let p = policy();
        let mut m = up(&c);
        let fx = m.step(Event::StopAsked { shim_alive: false }, c.now(), &p);
        assert_eq!(m.state, State::Stopped);
        assert!(sends(&fx).is_empty());
        assert!(fx.contains(&Effect::RemoveCgroup));
    }

    #[test]
    fn restart_stops_then_starts_and_clears_the_crash() {
        let c = Clock::new();
        let p = Policy {
            limit: 0,
            ..policy()
        };
        let mut m = up(&c);
        m.step(Event::Exited(exit(Some(1), None, 0)), c.now(), &p);
        assert_eq!(m.state, State::Crashed);
        let fx = m.step(Event::RestartAsked { shim_alive: true }, c.now(), &p);
        assert_eq!(m.crashed, None);
        assert_eq!(m.state, State::Stopping);
        assert!(fx.contains(&Effect::Save));
        let fx = m.step(Event::Stopped, c.now(), &p);
        assert_eq!(sends(&fx), vec![ShimCommand::Start]);
        assert_eq!(m.state, State::Starting);
        // With its shim dead, a restart spawns a new shim.
        let fx = m.step(Event::RestartAsked { shim_alive: false }, c.now(), &p);
        assert!(fx.contains(&Effect::SpawnShim));
        // A stopped instance is not restarted.
        m.step(Event::StopAsked { shim_alive: false }, c.now(), &p);
        assert!(m
            .step(Event::RestartAsked { shim_alive: true }, c.now(), &p)
            .is_empty());
        assert_eq!(m.state, State::Stopped);
    }

    #[test]
    fn failed_health_restarts_and_past_the_limit_crashes() {
        let c = Clock::new();
        let p = Policy {
            limit: 1,
            ..policy()
        };
        let mut m = up(&c);
        let g = m.generation;
        let fx = m.step(
            Event::Unhealthy {
                generation: g,
                reason: "3 liveness checks failed".into(),
            },
            c.now(),
            &p,
        );
        assert_eq!(m.state, State::Stopping);
        assert_eq!(
            sends(&fx),
            vec![ShimCommand::Stop {
                sig: 15,
                grace_ms: 5000
            }]
        );
        m.step(Event::Stopped, c.now(), &p);
        m.step(
            Event::Started {
                pid: 5,
                started_ms: 0,
            },
            c.now(),
            &p,
        );
        let g = m.generation;
        m.step(
            Event::Unhealthy {
                generation: g,
                reason: "not healthy".into(),
            },
            c.now(),
            &p,
        );
        let fx = m.step(Event::Stopped, c.now(), &p);
        assert_eq!(m.state, State::Crashed);
        assert!(fx.contains(&Effect::Publish(kinds::INSTANCE_CRASHED)));
        assert!(m.reason.as_deref().unwrap().contains("health: not healthy"));
    }

    #[test]
    fn health_during_a_stop_changes_nothing() {
        let c = Clock::new();
        let p = policy();
        let mut m = up(&c);
        m.step(Event::StopAsked { shim_alive: true }, c.now(), &p);
        let g = m.generation;
        let fx = m.step(
            Event::Unhealthy {
                generation: g,
                reason: "x".into(),
            },
            c.now(),
            &p,
        );
        assert!(fx.is_empty());
        assert_eq!(m.state, State::Stopping);
    }

    #[test]
    fn hello_while_stopping_asks_again_unless_this_connection_carried_the_stop() {
        let c = Clock::new();
        let p = policy();
        let mut m = up(&c);
        m.step(Event::StopAsked { shim_alive: true }, c.now(), &p);
        let hello = |stop_sent| Event::Hello {
            pid: Some(100),
            started_ms: None,
            last_exit: None,
            stop_sent,
        };
        assert!(m.step(hello(true), c.now(), &p).is_empty());
        let fx = m.step(hello(false), c.now(), &p);
        assert_eq!(
            sends(&fx),
            vec![ShimCommand::Stop {
                sig: 15,
                grace_ms: 5000
            }]
        );
    }

    #[test]
    fn hello_after_an_armed_restart_without_a_runner_counts_it_once() {
        let c = Clock::new();
        let p = policy();
        let mut m = Machine::new(true, 2, None, None);
        m.step(Event::Adopted { shim_alive: true }, c.now(), &p);
        let mut e = exit(None, Some(9), 5);
        e.restarted = true;
        let hello = Event::Hello {
            pid: Some(200),
            started_ms: Some(6),
            last_exit: Some(e),
            stop_sent: false,
        };
        let fx = m.step(hello.clone(), c.now(), &p);
        assert_eq!(m.restarts, 3);
        assert_eq!(m.pid, Some(200));
        assert_eq!(m.state, State::Starting);
        assert!(fx.contains(&Effect::Save));
        assert!(fx.contains(&Effect::WatchHealth {
            generation: m.generation
        }));
        // The same Hello again (a reconnection) is not a second restart.
        m.step(hello, c.now(), &p);
        assert_eq!(m.restarts, 3);
    }

    #[test]
    fn hello_with_an_unhandled_exit_and_no_app_handles_the_exit() {
        let c = Clock::new();
        let p = policy();
        let mut m = Machine::new(true, 0, None, None);
        m.step(Event::Adopted { shim_alive: true }, c.now(), &p);
        let fx = m.step(
            Event::Hello {
                pid: None,
                started_ms: None,
                last_exit: Some(exit(Some(1), None, 5)),
                stop_sent: false,
            },
            c.now(),
            &p,
        );
        assert_eq!(sends(&fx), vec![ShimCommand::Start]);
        assert_eq!(m.restarts, 1);
    }

    #[test]
    fn adoption_follows_the_record() {
        let c = Clock::new();
        let p = policy();
        // Running, shim alive: reconnect. Shim gone: a new shim.
        let mut m = Machine::new(true, 0, None, None);
        assert!(m
            .step(Event::Adopted { shim_alive: true }, c.now(), &p)
            .contains(&Effect::Connect));
        let mut m = Machine::new(true, 0, None, None);
        assert!(m
            .step(Event::Adopted { shim_alive: false }, c.now(), &p)
            .contains(&Effect::SpawnShim));
        // A stop was asked for: finish it.
        let mut m = Machine::new(false, 0, None, None);
        let fx = m.step(Event::Adopted { shim_alive: true }, c.now(), &p);
        assert_eq!(m.state, State::Stopping);
        assert!(fx.contains(&Effect::Connect));
        assert_eq!(
            sends(&fx),
            vec![ShimCommand::Stop {
                sig: 15,
                grace_ms: 5000
            }]
        );
        // Stopped by an older runner: the keep time starts now, recorded.
        let mut m = Machine::new(false, 0, None, None);
        let fx = m.step(Event::Adopted { shim_alive: false }, c.now(), &p);
        assert_eq!(m.state, State::Stopped);
        assert_eq!(m.stopped_at, Some(c.now().wall_ms));
        assert!(fx.contains(&Effect::Save));
        // Crashed stays crashed, and nothing is started.
        let mut m = Machine::new(true, 4, Some("gave up".into()), None);
        let fx = m.step(Event::Adopted { shim_alive: false }, c.now(), &p);
        assert_eq!(m.state, State::Crashed);
        assert!(!fx.contains(&Effect::SpawnShim));
    }

    #[test]
    fn a_dead_shim_crashes_the_instance_and_kills_its_cgroup_only() {
        let c = Clock::new();
        let p = policy();
        let mut m = up(&c);
        let fx = m.step(Event::ShimGone { shim_alive: true }, c.now(), &p);
        assert_eq!(
            fx.last(),
            Some(&Effect::Connect),
            "a broken connection only"
        );
        assert_eq!(m.state, State::Up);
        let fx = m.step(Event::ShimGone { shim_alive: false }, c.now(), &p);
        assert_eq!(m.state, State::Crashed);
        assert!(fx.contains(&Effect::KillCgroup));
        assert!(fx.contains(&Effect::ForgetPending));
        assert!(fx.contains(&Effect::Publish(kinds::INSTANCE_CRASHED)));
        assert_eq!(m.pid, None);
        // After a stop, the shim's going is expected: its cgroups are removed.
        let mut m = up(&c);
        m.step(Event::StopAsked { shim_alive: false }, c.now(), &p);
        let fx = m.step(Event::ShimGone { shim_alive: false }, c.now(), &p);
        assert!(fx.contains(&Effect::RemoveCgroup));
        assert!(!fx.contains(&Effect::KillCgroup));
        assert_eq!(m.state, State::Stopped);
    }

    #[test]
    fn an_exit_time_before_the_start_time_counts_as_no_uptime() {
        let c = Clock::new();
        let p = Policy {
            limit: 10,
            ..policy()
        };
        let mut m = up(&c);
        m.step(Event::Exited(exit(Some(1), None, 0)), c.now(), &p);
        m.step(
            Event::Started {
                pid: 2,
                started_ms: i64::MAX,
            },
            c.now(),
            &p,
        );
        let fx = m.step(Event::Exited(exit(Some(1), None, i64::MIN)), c.now(), &p);
        assert_eq!(timer(&fx).unwrap().0, Duration::from_millis(100));
    }

    #[test]
    fn a_shim_dying_during_a_stop_finishes_the_stop() {
        let c = Clock::new();
        let p = policy();
        let mut m = up(&c);
        m.step(Event::StopAsked { shim_alive: true }, c.now(), &p);
        let fx = m.step(Event::ShimGone { shim_alive: false }, c.now(), &p);
        assert_eq!(m.state, State::Stopped);
        assert!(!m.running);
        assert!(fx.contains(&Effect::KillCgroup) && fx.contains(&Effect::RemoveCgroup));
        assert!(!fx.contains(&Effect::Publish(kinds::INSTANCE_CRASHED)));
    }

    #[test]
    fn a_shim_dying_during_a_restart_gets_a_new_shim_and_exits_are_handled_again() {
        let c = Clock::new();
        let p = Policy {
            limit: 10,
            ..policy()
        };
        let mut m = up(&c);
        m.step(Event::RestartAsked { shim_alive: true }, c.now(), &p);
        let fx = m.step(Event::ShimGone { shim_alive: false }, c.now(), &p);
        assert!(fx.contains(&Effect::SpawnShim), "{fx:?}");
        assert_eq!(m.state, State::Starting);
        m.step(
            Event::Started {
                pid: 9,
                started_ms: 0,
            },
            c.now(),
            &p,
        );
        // The new app's crash is a crash, not the end of a stop.
        let fx = m.step(Event::Exited(exit(Some(1), None, 0)), c.now(), &p);
        assert!(
            fx.contains(&Effect::Publish(kinds::INSTANCE_DOWN)),
            "{fx:?}"
        );
        assert_eq!(sends(&fx), vec![ShimCommand::Start]);
    }

    #[test]
    fn after_a_crash_mid_stop_a_restart_supervises_the_app_again() {
        let c = Clock::new();
        let p = Policy {
            limit: 10,
            ..policy()
        };
        let mut m = up(&c);
        // A health restart is under way when the shim dies: crashed.
        let g = m.generation;
        m.step(
            Event::Unhealthy {
                generation: g,
                reason: "x".into(),
            },
            c.now(),
            &p,
        );
        m.step(
            Event::ShimUnstartable {
                reason: "gone".into(),
            },
            c.now(),
            &p,
        );
        assert_eq!(m.state, State::Crashed);
        m.step(Event::RestartAsked { shim_alive: false }, c.now(), &p);
        m.step(
            Event::Started {
                pid: 9,
                started_ms: 0,
            },
            c.now(),
            &p,
        );
        let fx = m.step(Event::Exited(exit(Some(1), None, 0)), c.now(), &p);
        assert!(
            fx.contains(&Effect::Publish(kinds::INSTANCE_DOWN)),
            "{fx:?}"
        );
        assert_eq!(m.pid, None);
        assert_ne!(m.state, State::Up);
    }

    #[test]
    fn a_restart_never_cancels_a_stop_in_progress() {
        let c = Clock::new();
        let p = policy();
        let mut m = up(&c);
        m.step(Event::StopAsked { shim_alive: true }, c.now(), &p);
        assert!(m.stopping_for_good());
        assert!(m
            .step(Event::RestartAsked { shim_alive: true }, c.now(), &p)
            .is_empty());
        m.step(Event::Stopped, c.now(), &p);
        assert_eq!(m.state, State::Stopped);
    }

    #[test]
    fn a_new_connection_or_shim_is_armed_again() {
        let c = Clock::new();
        let p = policy();
        let mut m = up(&c); // armed by its start
                            // The connection broke; the shim (alive) says Hello again.
        m.step(Event::ShimGone { shim_alive: true }, c.now(), &p);
        m.step(
            Event::Hello {
                pid: Some(100),
                started_ms: Some(0),
                last_exit: None,
                stop_sent: false,
            },
            c.now(),
            &p,
        );
        let g = m.generation;
        let fx = m.step(Event::Healthy { generation: g }, c.now(), &p);
        assert_eq!(
            sends(&fx),
            vec![ShimCommand::Arm {
                normal_exit: vec![0]
            }]
        );
        // A shim that used its arm while nobody listened is armed again too.
        let mut e = exit(None, Some(9), 5);
        e.restarted = true;
        m.step(
            Event::Hello {
                pid: Some(101),
                started_ms: Some(6),
                last_exit: Some(e),
                stop_sent: false,
            },
            c.now(),
            &p,
        );
        let g = m.generation;
        let fx = m.step(Event::Healthy { generation: g }, c.now(), &p);
        assert_eq!(
            sends(&fx),
            vec![ShimCommand::Arm {
                normal_exit: vec![0]
            }]
        );
    }
}
