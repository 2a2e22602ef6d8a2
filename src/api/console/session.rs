//! Console sessions, held by the server: a random id in the browser's
//! cookie, and here the signed-in key's credential (its id, prefix and the
//! digest of its secret, never the secret), a CSRF token, and the times
//! that end it. Sign-in attempts are counted per client address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};

use chrono::{DateTime, Duration, Utc};
use keygate_core::clock::Clock;
use keygate_core::token::Credential;
use subtle::ConstantTimeEq;

/// How long sessions live and how often one may try to sign in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConsoleSettings {
    /// A session unused for this long ends.
    pub idle_timeout: std::time::Duration,
    /// A session ends this long after sign-in, used or not.
    pub absolute_timeout: std::time::Duration,
    /// Sign-in attempts one client address may make per minute.
    pub sign_ins_per_minute: u32,
    /// Most sessions held at once; sign-in is refused beyond it.
    pub max_sessions: usize,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            idle_timeout: std::time::Duration::from_secs(30 * 60),
            absolute_timeout: std::time::Duration::from_secs(12 * 3600),
            sign_ins_per_minute: 10,
            max_sessions: 10_000,
        }
    }
}

/// A signed-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// What the key's token was, to check again on every request.
    pub credential: Credential,
    /// Every state-changing form carries it back.
    pub csrf: String,
    signed_in_at: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    /// A freshly created or rotated token, shown on the next page only.
    once: Option<(uuid::Uuid, String)>,
}

/// 32 bytes from the OS CSPRNG, hex-encoded.
pub fn random_id() -> Result<String, getrandom::Error> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `presented` is `expected`, in constant time.
pub fn same(presented: &str, expected: &str) -> bool {
    presented.as_bytes().ct_eq(expected.as_bytes()).into()
}

/// Why a session could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// [`ConsoleSettings::max_sessions`] are open.
    #[error("too many console sessions are open")]
    Full,
    /// The OS random source failed.
    #[error("OS random source failed: {0}")]
    Random(getrandom::Error),
}

/// Every open session, by id.
pub struct Sessions {
    open: Mutex<HashMap<String, Session>>,
    attempts: Mutex<HashMap<IpAddr, (DateTime<Utc>, u32)>>,
    clock: Arc<dyn Clock>,
    settings: ConsoleSettings,
}

impl Sessions {
    /// Sessions timed by `clock`.
    pub fn new(clock: Arc<dyn Clock>, settings: ConsoleSettings) -> Self {
        Self {
            open: Mutex::default(),
            attempts: Mutex::default(),
            clock,
            settings,
        }
    }

    fn idle(&self) -> Duration {
        Duration::from_std(self.settings.idle_timeout).unwrap_or(Duration::MAX)
    }

    fn absolute(&self) -> Duration {
        Duration::from_std(self.settings.absolute_timeout).unwrap_or(Duration::MAX)
    }

    fn alive(&self, s: &Session, now: DateTime<Utc>) -> bool {
        now - s.last_seen < self.idle() && now - s.signed_in_at < self.absolute()
    }

    /// Counts a sign-in attempt from `ip`; `false` once it has made
    /// [`ConsoleSettings::sign_ins_per_minute`] in the current minute.
    pub fn may_try_sign_in(&self, ip: IpAddr) -> bool {
        let now = self.clock.now();
        let mut attempts = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
        if attempts.len() > 10_000 {
            attempts.retain(|_, (since, _)| now - *since < Duration::minutes(1));
        }
        let entry = attempts.entry(ip).or_insert((now, 0));
        if now - entry.0 >= Duration::minutes(1) {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 <= self.settings.sign_ins_per_minute
    }

    /// Opens a session for `credential`, returning its id for the cookie.
    pub fn open(&self, credential: Credential) -> Result<String, OpenError> {
        let now = self.clock.now();
        let id = random_id().map_err(OpenError::Random)?;
        let csrf = random_id().map_err(OpenError::Random)?;
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.len() >= self.settings.max_sessions {
            open.retain(|_, s| self.alive(s, now));
            if open.len() >= self.settings.max_sessions {
                return Err(OpenError::Full);
            }
        }
        open.insert(
            id.clone(),
            Session {
                credential,
                csrf,
                signed_in_at: now,
                last_seen: now,
                once: None,
            },
        );
        Ok(id)
    }

    /// The session with this id if it has not timed out, marking it used;
    /// a timed-out one is ended.
    pub fn touch(&self, id: &str) -> Option<Session> {
        let now = self.clock.now();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let session = open.get_mut(id)?;
        if !self.alive(session, now) {
            open.remove(id);
            return None;
        }
        session.last_seen = now;
        Some(session.clone())
    }

    /// Ends the session (sign-out, or its key no longer authenticates).
    pub fn end(&self, id: &str) {
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Keeps `token` of `key_id` for the session's next page, which alone shows it.
    pub fn keep_once(&self, id: &str, key_id: uuid::Uuid, token: String) {
        if let Some(s) = self
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(id)
        {
            s.once = Some((key_id, token));
        }
    }

    /// The token kept by [`Self::keep_once`] for `key_id`, taken: asking
    /// again gives `None`.
    pub fn take_once(&self, id: &str, key_id: uuid::Uuid) -> Option<String> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let s = open.get_mut(id)?;
        match &s.once {
            Some((k, _)) if *k == key_id => s.once.take().map(|(_, t)| t),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use keygate_core::clock::ManualClock;
    use keygate_core::token::SecretDigest;

    use super::*;

    fn credential() -> Credential {
        Credential {
            key_id: uuid::Uuid::new_v4(),
            prefix: "kg_live_x".into(),
            digest: SecretDigest::of("secret"),
        }
    }

    #[test]
    fn sessions_end_when_idle_or_old() {
        let clock = Arc::new(ManualClock::new(Utc::now()));
        let sessions = Sessions::new(clock.clone(), ConsoleSettings::default());
        let id = sessions.open(credential()).unwrap();
        assert_eq!(id.len(), 64);
        clock.advance(Duration::minutes(29));
        assert!(sessions.touch(&id).is_some());
        clock.advance(Duration::minutes(29));
        assert!(sessions.touch(&id).is_some(), "use keeps it alive");
        clock.advance(Duration::minutes(31));
        assert!(sessions.touch(&id).is_none(), "idle 31 minutes");

        let id = sessions.open(credential()).unwrap();
        for _ in 0..25 {
            clock.advance(Duration::minutes(29));
            if sessions.touch(&id).is_none() {
                break;
            }
        }
        assert!(sessions.touch(&id).is_none(), "12 hours at most");
    }

    #[test]
    fn a_kept_token_is_shown_once() {
        let clock = Arc::new(ManualClock::new(Utc::now()));
        let sessions = Sessions::new(clock, ConsoleSettings::default());
        let id = sessions.open(credential()).unwrap();
        let key = uuid::Uuid::new_v4();
        sessions.keep_once(&id, key, "tok".into());
        assert_eq!(sessions.take_once(&id, uuid::Uuid::new_v4()), None);
        assert_eq!(sessions.take_once(&id, key).as_deref(), Some("tok"));
        assert_eq!(sessions.take_once(&id, key), None);
    }

    #[test]
    fn sign_ins_are_limited_per_address() {
        let clock = Arc::new(ManualClock::new(Utc::now()));
        let sessions = Sessions::new(clock.clone(), ConsoleSettings::default());
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..10 {
            assert!(sessions.may_try_sign_in(a));
        }
        assert!(!sessions.may_try_sign_in(a));
        assert!(sessions.may_try_sign_in(b));
        clock.advance(Duration::minutes(1));
        assert!(sessions.may_try_sign_in(a));
    }
}
