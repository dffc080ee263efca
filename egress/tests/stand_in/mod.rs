//! A local stand-in of a platform's send API on 127.0.0.1:0: it records
//! every request (method, path and query, headers, body) and answers each
//! as a script says (status, headers, JSON body). Shared by the platform sender tests.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One request the stand-in received.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: Instant,
    pub method: Method,
    /// Path and query.
    pub uri: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }
}

/// The stand-in's answer: status, headers, body.
pub type Answer = (u16, Vec<(&'static str, String)>, String);

/// How the stand-in answers a request, given how many came before it.
type Script = dyn Fn(usize, &Received) -> Answer + Send + Sync;

#[derive(Clone)]
pub struct StandIn {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Script>,
}

impl StandIn {
    /// A server on 127.0.0.1:0 answering every request with `script`.
    pub async fn start(
        script: impl Fn(usize, &Received) -> Answer + Send + Sync + 'static,
    ) -> StandIn {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stand_in = StandIn {
            url: format!("http://{}", listener.local_addr().unwrap()),
            received: Arc::default(),
            script: Arc::new(script),
        };
        let app = Router::new().fallback(answer).with_state(stand_in.clone());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        stand_in
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Asserts that the requests `which` picks came at least `apart` from
    /// one another (a rate limit kept), and that there were `count`.
    pub fn assert_spaced(&self, which: impl Fn(&Received) -> bool, count: usize, apart: Duration) {
        let mut times: Vec<Instant> = self
            .received()
            .iter()
            .filter(|request| which(request))
            .map(|request| request.at)
            .collect();
        times.sort();
        assert_eq!(times.len(), count);
        for pair in times.windows(2) {
            assert!(
                pair[1] - pair[0] >= apart,
                "two requests {:?} apart, less than {apart:?}",
                pair[1] - pair[0]
            );
        }
    }
}

async fn answer(
    State(stand_in): State<StandIn>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let received = Received {
        at: Instant::now(),
        method,
        uri: uri.to_string(),
        headers,
        body,
    };
    let nth = {
        let mut all = stand_in.received.lock().unwrap();
        all.push(received.clone());
        all.len() - 1
    };
    let (status, headers, body) = (stand_in.script)(nth, &received);
    let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
    response
        .headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    for (name, value) in headers {
        response.headers_mut().insert(name, value.parse().unwrap());
    }
    response
}
