//! The web console's login sessions: a random id in an HttpOnly cookie,
//! kept in memory (a daemon restart logs everyone out). A session ends
//! after [`IDLE`] without a request, and at the latest [`LIFETIME`] after
//! the login.

use std::collections::HashMap;

use axum::http::HeaderMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A session unused this long is over.
pub const IDLE: Duration = Duration::from_secs(30 * 60);
/// No session lasts longer than this.
pub const LIFETIME: Duration = Duration::from_secs(12 * 60 * 60);
/// The cookie that carries the session's id.
pub const COOKIE: &str = "ftd_session";
/// Most sessions at once (the oldest goes first).
const MAX_SESSIONS: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot draw a session id: {0}")]
    Random(getrandom::Error),
}

/// One logged-in user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub user: String,
    /// Opened with the API token (not a user's password).
    pub by_token: bool,
    /// The user's record revision at the login (a new password or a
    /// delete changes it, which ends the session).
    pub user_revision: u64,
    created: Instant,
    last_used: Instant,
}

impl Session {
    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.last_used) >= IDLE || now.duration_since(self.created) >= LIFETIME
    }

    /// When the session ends if it is not used again.
    pub fn ends_in(&self, now: Instant) -> Duration {
        let idle_end = self.last_used + IDLE;
        let life_end = self.created + LIFETIME;
        idle_end.min(life_end).saturating_duration_since(now)
    }
}

#[derive(Default)]
pub struct Sessions {
    by_id: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Opens a session for `user`; returns its id.
    pub fn open(
        &self,
        user: &str,
        by_token: bool,
        user_revision: u64,
    ) -> Result<String, SessionError> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(SessionError::Random)?;
        let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        let now = Instant::now();
        let mut map = self.lock();
        map.retain(|_, s| !s.expired(now));
        if map.len() >= MAX_SESSIONS {
            if let Some(oldest) = map
                .iter()
                .min_by_key(|(_, s)| s.last_used)
                .map(|(k, _)| k.clone())
            {
                map.remove(&oldest);
            }
        }
        map.insert(
            id.clone(),
            Session {
                user: user.to_string(),
                by_token,
                user_revision,
                created: now,
                last_used: now,
            },
        );
        Ok(id)
    }

    /// The session `id` if it is live (its idle time starts again).
    pub fn touch(&self, id: &str) -> Option<Session> {
        self.touch_at(id, Instant::now())
    }

    fn touch_at(&self, id: &str, now: Instant) -> Option<Session> {
        let mut map = self.lock();
        let live = map.get(id).is_some_and(|s| !s.expired(now));
        if !live {
            map.remove(id);
            return None;
        }
        let session = map.get_mut(id)?;
        session.last_used = now;
        Some(session.clone())
    }

    /// The session `id` if it is live, its idle time not restarted (a
    /// stream it opened asks this, not the user).
    pub fn peek(&self, id: &str) -> Option<Session> {
        let now = Instant::now();
        self.lock().get(id).filter(|s| !s.expired(now)).cloned()
    }

    /// Ends the session `id` (logout).
    pub fn close(&self, id: &str) -> bool {
        self.lock().remove(id).is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.by_id.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The session id in a request's `Cookie` headers, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.trim().to_string())
        .filter(|v| !v.is_empty())
}

/// The `Set-Cookie` value that gives the browser session `id`; `secure`:
/// the browser reached the console over HTTPS (a TLS proxy in front of
/// `ftd` said so), and the cookie must never travel in the clear.
pub fn set_cookie(id: &str, secure: bool) -> String {
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        LIFETIME.as_secs(),
        if secure { "; Secure" } else { "" }
    )
}

/// Whether the request reached a TLS proxy in front of `ftd` (which says
/// so with `X-Forwarded-Proto: https`, as nginx and HAProxy are set up to).
/// `ftd` itself serves plain HTTP.
pub fn came_over_https(headers: &HeaderMap) -> bool {
    headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(',')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("https")
        })
}

/// The `Set-Cookie` value that removes the session cookie.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_lives_while_used_and_ends_idle_or_old() {
        let sessions = Sessions::default();
        let id = sessions.open("admin", true, 0).unwrap();
        assert_eq!(id.len(), 64);
        let start = Instant::now();
        assert_eq!(sessions.touch_at(&id, start).unwrap().user, "admin");
        // Used every 20 minutes: alive past the idle time...
        let mut t = start;
        for _ in 0..3 {
            t += Duration::from_secs(20 * 60);
            assert!(sessions.touch_at(&id, t).is_some());
        }
        // ... idle for 30 minutes: over, and gone.
        assert!(sessions
            .touch_at(&id, t + IDLE + Duration::from_secs(1))
            .is_none());
        assert!(sessions.touch_at(&id, t).is_none());
        // Never past its lifetime, however used.
        let id = sessions.open("admin", true, 0).unwrap();
        let created = Instant::now();
        let mut t = created;
        while t < created + LIFETIME - Duration::from_secs(60) {
            t += Duration::from_secs(25 * 60);
            if t >= created + LIFETIME {
                break;
            }
            assert!(sessions.touch_at(&id, t).is_some());
        }
        assert!(sessions
            .touch_at(&id, created + LIFETIME + Duration::from_secs(1))
            .is_none());
        // Logout ends it; an unknown id is no session.
        let id = sessions.open("admin", true, 0).unwrap();
        assert!(sessions.close(&id));
        assert!(sessions.touch(&id).is_none());
        assert!(sessions.touch("nope").is_none());
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = axum::http::HeaderMap::new();
        headers.append(
            axum::http::header::COOKIE,
            "a=1; ftd_session=abc ; b=2".parse().unwrap(),
        );
        assert_eq!(session_cookie(&headers).as_deref(), Some("abc"));
        let mut headers = axum::http::HeaderMap::new();
        headers.append(axum::http::header::COOKIE, "ftd_session=".parse().unwrap());
        assert_eq!(session_cookie(&headers), None);
        assert!(set_cookie("abc", false).contains("HttpOnly; SameSite=Strict"));
        assert!(!set_cookie("abc", false).contains("Secure"));
        assert!(set_cookie("abc", true).ends_with("; Secure"));
        let mut headers = HeaderMap::new();
        assert!(!came_over_https(&headers));
        headers.insert("x-forwarded-proto", "HTTPS, http".parse().unwrap());
        assert!(came_over_https(&headers));
        headers.insert("x-forwarded-proto", "http".parse().unwrap());
        assert!(!came_over_https(&headers));
    }
}
