//! The load generator: closed loop (a fixed number of callers, each sending
//! its next call when the last one answered) for peak throughput, and open
//! loop (calls sent at a fixed arrival rate whatever the answers do) for
//! latency, measured from each call's intended send time so queueing in the
//! client or the server is counted, not hidden (no coordinated omission).

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use hdrhistogram::Histogram;

/// One call of the workload; `n` numbers the call (pick a connection or a
/// key with it). `Err` is a failed call or a wrong answer.
pub type Call = Arc<dyn Fn(u64) -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// Wraps an async closure as a [`Call`].
pub fn call<F, Fut>(f: F) -> Call
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    Arc::new(move |n| Box::pin(f(n)))
}

/// How long a run warms up, then measures.
#[derive(Debug, Clone, Copy)]
pub struct Phases {
    pub warmup: Duration,
    pub measure: Duration,
}

/// What one run measured: latencies in nanoseconds.
#[derive(Debug, Clone)]
pub struct Stats {
    pub hist: Histogram<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// The measured window.
    pub elapsed: Duration,
    /// Open loop only: the arrival rate asked for, calls per second.
    pub offered: Option<f64>,
    /// Open loop only: the run stopped early because too many calls were in flight.
    pub overloaded: bool,
}

/// A histogram for latencies from 1 ns to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    // Fixed, valid bounds: this cannot fail.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap_or_else(|_| unreachable!())
}

impl Stats {
    pub fn new(elapsed: Duration, offered: Option<f64>) -> Self {
        Self {
            hist: histogram(),
            errors: 0,
            first_error: None,
            elapsed,
            offered,
            overloaded: false,
        }
    }

    fn record(&mut self, latency: Duration, outcome: Result<(), String>) {
        match outcome {
            Ok(()) => {
                let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
                self.hist.saturating_record(ns.max(1));
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
    }

    pub fn merge(&mut self, other: &Stats) {
        // Same bounds everywhere: adding cannot fail.
        let _ = self.hist.add(&other.hist);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error.clone_from(&other.first_error);
        }
        self.overloaded |= other.overloaded;
    }

    /// Successful calls per second over the measured window.
    pub fn rps(&self) -> f64 {
        self.hist.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The latency at quantile `q` (0.5, 0.99 …), in microseconds.
    pub fn us(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// The latency at quantile `q`, in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.us(q) / 1000.0
    }

    /// Calls that answered.
    pub fn calls(&self) -> u64 {
        self.hist.len()
    }

    /// Fails when any call failed (for workloads where every call must succeed).
    pub fn expect_no_errors(&self, what: &str) -> Result<(), String> {
        match (&self.first_error, self.errors) {
            (Some(e), n) if n > 0 => Err(format!("{what}: {n} calls failed, first: {e}")),
            _ => Ok(()),
        }
    }
}

/// Peak throughput: `callers` loops, each sending its next call as soon as
/// its last one answered, for `phases.warmup`, then measured for `phases.measure`.
pub async fn closed(call: &Call, callers: usize, phases: Phases) -> Stats {
    let start = Instant::now();
    let measure_from = start + phases.warmup;
    let end = measure_from + phases.measure;
    let tasks: Vec<_> = (0..callers)
        .map(|w| {
            let call = Arc::clone(call);
            tokio::spawn(async move {
                let mut stats = Stats::new(phases.measure, None);
                let mut n = w as u64;
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    let outcome = call(n).await;
                    if sent >= measure_from {
                        stats.record(sent.elapsed(), outcome);
                    }
                    n += callers as u64;
                }
                stats
            })
        })
        .collect();
    let mut total = Stats::new(phases.measure, None);
    for task in tasks {
        match task.await {
            Ok(stats) => total.merge(&stats),
            Err(e) => total.record(Duration::ZERO, Err(format!("caller task: {e}"))),
        }
    }
    total
}

/// Latency at a fixed arrival rate: call `n` is due at `start + n / rate`,
/// sent then whatever earlier calls are doing, and its latency runs from
/// that due time. Sending is paced by an OS thread (`std::thread::sleep`
/// keeps to tens of microseconds; tokio's timer only to a millisecond).
/// Stops early, marked overloaded, when more than `max_in_flight` calls wait.
pub async fn open(call: &Call, rate: f64, phases: Phases, max_in_flight: usize) -> Stats {
    let rate = rate.max(1.0);
    let shared = Arc::new(Mutex::new(Stats::new(phases.measure, Some(rate))));
    let in_flight = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let handle = tokio::runtime::Handle::current();
    let start = Instant::now() + Duration::from_millis(5);
    let measure_from = start + phases.warmup;
    let end = measure_from + phases.measure;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let pacer = {
        let (call, shared, in_flight) = (
            Arc::clone(call),
            Arc::clone(&shared),
            Arc::clone(&in_flight),
        );
        std::thread::spawn(move || {
            use std::sync::atomic::Ordering;
            let mut n: u64 = 0;
            loop {
                let due = start + interval.mul_f64(n as f64);
                if due >= end {
                    return false;
                }
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                if in_flight.load(Ordering::Relaxed) > max_in_flight {
                    return true;
                }
                in_flight.fetch_add(1, Ordering::Relaxed);
                let (call, shared, in_flight) = (
                    Arc::clone(&call),
                    Arc::clone(&shared),
                    Arc::clone(&in_flight),
                );
                handle.spawn(async move {
                    let outcome = call(n).await;
                    let latency = due.elapsed();
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                    if due >= measure_from {
                        shared
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .record(latency, outcome);
                    }
                });
                n += 1;
            }
        })
    };
    let overloaded = tokio::task::spawn_blocking(move || pacer.join().unwrap_or(true))
        .await
        .unwrap_or(true);
    // Let the last calls answer (a bounded wait: a stuck call is a failure).
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_flight.load(std::sync::atomic::Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stuck = in_flight.load(std::sync::atomic::Ordering::Relaxed);
    let mut stats = shared
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    if stuck > 0 {
        stats.errors += stuck as u64;
        stats
            .first_error
            .get_or_insert_with(|| format!("{stuck} calls unanswered after 10 s"));
    }
    stats.overloaded = overloaded;
    stats
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sleeper(d: Duration) -> Call {
        call(move |_| async move {
            tokio::time::sleep(d).await;
            Ok(())
        })
    }

    #[tokio::test]
    async fn closed_loop_counts_every_answer_in_the_window() {
        let phases = Phases {
            warmup: Duration::from_millis(50),
            measure: Duration::from_millis(200),
        };
        let stats = closed(&sleeper(Duration::from_millis(10)), 4, phases).await;
        // 4 callers, at least 10 ms a call: at most 4 × 20 calls start in
        // the 200 ms window (a busy machine only makes calls slower, fewer).
        assert!((4..=88).contains(&stats.calls()), "calls {}", stats.calls());
        assert_eq!(stats.errors, 0);
        assert!(stats.ms(0.5) >= 10.0);
    }

    #[tokio::test]
    async fn open_loop_sends_at_the_rate_asked_and_counts_failures() {
        let phases = Phases {
            warmup: Duration::ZERO,
            measure: Duration::from_millis(300),
        };
        let failing = call(|n| async move {
            if n % 10 == 0 {
                Err("no".to_owned())
            } else {
                Ok(())
            }
        });
        let stats = open(&failing, 1000.0, phases, 1000).await;
        let sent = stats.calls() + stats.errors;
        assert!((280..=310).contains(&sent), "sent {sent}");
        assert!((28..=31).contains(&stats.errors), "errors {}", stats.errors);
        assert!(!stats.overloaded);
    }

    #[tokio::test]
    async fn open_loop_latency_includes_the_queue() {
        // Calls take 20 ms but arrive every millisecond with at most 5 in
        // flight: the run is overloaded and says so.
        let phases = Phases {
            warmup: Duration::ZERO,
            measure: Duration::from_millis(200),
        };
        let stats = open(&sleeper(Duration::from_millis(20)), 1000.0, phases, 5).await;
        assert!(stats.overloaded);
    }
}
