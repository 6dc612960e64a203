//! `GET /v1/events`: server-sent events. The supervisor's tick sends a volume's JSON
//! when it changed; a new client first gets every volume as it is. Streams end when
//! the manager stops, so a connected client never holds up its exit.

use crate::mgr::Shared;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt};
use serde_json::json;
use std::convert::Infallible;
use std::time::Duration;
use tokio_stream::wrappers::BroadcastStream;

pub async fn events(
    State((m, stop)): State<(Shared, tokio::sync::watch::Receiver<bool>)>,
    h: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let base = crate::api::base(&m, &h);
    let rx = m.events.subscribe();
    let first: Vec<String> = m
        .lock()
        .values()
        .map(|e| json!({"type": "volume", "id": e.st.name, "data": crate::view::volume(&m, e, &base)}).to_string())
        .collect();
    // A client too slow to keep up loses events (Lagged) rather than the manager's
    // memory growing; the next change of each volume brings it up to date.
    let live = BroadcastStream::new(rx).filter_map(|r| async move { r.ok() });
    let mut stop = stop;
    let stopped = async move {
        if !*stop.borrow() {
            let _ = stop.changed().await;
        }
    };
    let s = stream::iter(first).chain(live).map(|d| Ok(Event::default().data(d))).take_until(stopped);
    Sse::new(s).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive"))
}
