//! An open-loop HTTP/1.1 client for the Envoy scenario (wrk measures peak
//! throughput; it cannot hold a fixed rate). Requests are due at a fixed
//! rate and queue for one of `connections` keep-alive connections; latency
//! runs from the due time, so a slow answer delays the queue and shows.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::load::{Phases, Stats, histogram};

/// One request/answer on `stream`; Ok when the status is 200.
pub async fn exchange(
    stream: &mut TcpStream,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> Result<(), String> {
    stream.write_all(request).await.map_err(|e| e.to_string())?;
    buf.clear();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("connection closed".into());
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        if buf.len() >= end + 4 + length {
            return if head.starts_with("http/1.1 200") {
                Ok(())
            } else {
                Err(head.lines().next().unwrap_or("").to_owned())
            };
        }
    }
}

/// `request` sent to `addr` at `rate` a second over `connections` connections.
pub async fn open(
    addr: SocketAddr,
    request: Vec<u8>,
    rate: f64,
    phases: Phases,
    connections: usize,
) -> Result<Stats, String> {
    let request: Arc<[u8]> = request.into();
    let (tx, rx) = mpsc::unbounded_channel::<Instant>();
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + phases.warmup;
    let end = measure_from + phases.measure;
    let shared = Arc::new(Mutex::new((histogram(), 0u64, None::<String>)));
    let queued = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..connections {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("{addr}: {e}"))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let (rx, request, shared, queued) = (
            Arc::clone(&rx),
            Arc::clone(&request),
            Arc::clone(&shared),
            Arc::clone(&queued),
        );
        workers.push(tokio::spawn(async move {
            let mut buf = Vec::with_capacity(4096);
            loop {
                let Some(due) = rx.lock().await.recv().await else {
                    return;
                };
                queued.fetch_sub(1, Ordering::Relaxed);
                let outcome = exchange(&mut stream, &request, &mut buf).await;
                let latency = due.elapsed();
                if due >= measure_from {
                    let mut s = shared.lock().unwrap_or_else(PoisonError::into_inner);
                    match outcome {
                        Ok(()) => {
                            let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
                            s.0.saturating_record(ns.max(1));
                        }
                        Err(e) => {
                            s.1 += 1;
                            s.2.get_or_insert(e);
                        }
                    }
                }
            }
        }));
    }
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    let pacer_queued = Arc::clone(&queued);
    let overloaded = tokio::task::spawn_blocking(move || {
        let mut n = 0u64;
        loop {
            let due = start + interval.mul_f64(n as f64);
            if due >= end {
                return false;
            }
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            if pacer_queued.load(Ordering::Relaxed) > 10_000 {
                return true;
            }
            pacer_queued.fetch_add(1, Ordering::Relaxed);
            if tx.send(due).is_err() {
                return true;
            }
            n += 1;
        }
    })
    .await
    .unwrap_or(true);
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(10), w).await;
    }
    let (hist, errors, first_error) = shared
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    Ok(Stats {
        hist,
        errors,
        first_error,
        elapsed: phases.measure,
        offered: Some(rate),
        overloaded,
    })
}
