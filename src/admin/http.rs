//! The admin router: JSON endpoints, the event stream, `/metrics` and the page.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::collect::{self, KeyView, Overview, QueueView};
use super::sources::AdminQueue;
use super::Admin;
use crate::queue::{DeadReason, ItemId, WorkError};

/// The page, served at the router's root.
const PAGE: &str = include_str!("page.html");
/// The default and largest page sizes of list endpoints.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 1000;
/// The default and longest flush waits.
const DEFAULT_FLUSH_MS: u64 = 5_000;
const MAX_FLUSH_MS: u64 = 60_000;
/// The most workers `max_workers` accepts.
const MAX_WORKERS: usize = 65_536;
/// Dead letters per queue sent on the event stream.
const LIVE_DEAD: usize = 50;

pub(super) fn router(admin: Admin) -> Router {
    let limit = admin.inner.body_limit;
    Router::new()
        .route("/", get(page_html))
        .route("/metrics", get(metrics))
        .route("/api/overview", get(overview))
        .route("/api/events", get(events))
        .route("/api/topics", get(topics))
        .route("/api/topics/{topic}", get(topic))
        .route("/api/pools", get(pools))
        .route("/api/servers", get(servers))
        .route("/api/queues", get(queues))
        .route("/api/queues/{name}", get(queue))
        .route("/api/queues/{name}/flush", post(flush))
        .route("/api/queues/{name}/max_workers", put(set_max_workers))
        .route(
            "/api/queues/{name}/items",
            axum::routing::delete(remove_all),
        )
        .route(
            "/api/queues/{name}/dead",
            get(dead_list).delete(dead_delete_all),
        )
        .route("/api/queues/{name}/dead/requeue", post(dead_requeue_all))
        .route(
            "/api/queues/{name}/dead/{id}",
            get(dead_show).delete(dead_delete),
        )
        .route("/api/queues/{name}/dead/{id}/requeue", post(dead_requeue))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(limit, length_limit))
        .with_state(admin)
}

/// A 4xx (or 503/504) answer: `{"error": message, "code": code}`.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn bad(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body<'a> {
            error: &'a str,
            code: &'a str,
        }
        let body = Json(Body {
            error: &self.message,
            code: self.code,
        });
        (self.status, body).into_response()
    }
}

fn work_error(e: WorkError) -> ApiError {
    match e {
        WorkError::Timeout { pending } => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("timed out with {pending} items pending"),
        ),
        WorkError::Shutdown => ApiError::new(StatusCode::CONFLICT, "shut_down", e.to_string()),
        other => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "backend",
            error_chain(&other),
        ),
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Refuses a body whose announced length is over the limit before reading it.
async fn length_limit(State(limit): State<usize>, req: Request, next: Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > limit as u64) {
        return too_large(limit).into_response();
    }
    next.run(req).await
}

fn too_large(limit: usize) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("request body over {limit} bytes"),
    )
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed here",
    )
}

/// The checks of every mutating endpoint: same-site, writable, token.
fn authorize(admin: &Admin, headers: &HeaderMap) -> Result<(), ApiError> {
    let cross = || {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "cross_site",
            "cross-site request refused",
        )
    };
    if let Some(site) = headers.get("sec-fetch-site") {
        if !matches!(site.as_bytes(), b"same-origin" | b"none") {
            return Err(cross());
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().map_err(|_| cross())?;
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .ok_or_else(cross)?;
        let origin_host = origin.split_once("://").map(|(_, rest)| rest);
        if origin_host != Some(host) {
            return Err(cross());
        }
    }
    let Some(token) = &admin.inner.token else {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "read_only",
            "the admin is read-only: no token is configured",
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given) if same_secret(given.as_bytes(), token.as_bytes()) => Ok(()),
        _ => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is needed",
        )),
    }
}

/// Compares without stopping at the first difference.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Paging {
    offset: Option<usize>,
    limit: Option<usize>,
}

/// A page of a list.
#[derive(Debug, Serialize)]
struct Page<T> {
    total: usize,
    offset: usize,
    limit: usize,
    items: Vec<T>,
}

fn paging(q: Result<Query<Paging>, QueryRejection>) -> Result<(usize, usize), ApiError> {
    let Query(p) = q.map_err(|e| ApiError::bad("bad_query", e.body_text()))?;
    let limit = p.limit.unwrap_or(DEFAULT_LIMIT);
    if limit == 0 || limit > MAX_LIMIT {
        return Err(ApiError::bad(
            "bad_query",
            format!("limit must be 1 to {MAX_LIMIT}"),
        ));
    }
    Ok((p.offset.unwrap_or(0), limit))
}

fn page<T>(all: Vec<T>, offset: usize, limit: usize) -> Page<T> {
    let total = all.len();
    let items = all.into_iter().skip(offset).take(limit).collect();
    Page {
        total,
        offset,
        limit,
        items,
    }
}

fn path<T>(p: Result<Path<T>, PathRejection>) -> Result<T, ApiError> {
    p.map(|Path(t)| t)
        .map_err(|e| ApiError::bad("bad_path", e.body_text()))
}

fn parse_id(id: &str) -> Result<ItemId, ApiError> {
    id.parse::<u64>()
        .map(ItemId)
        .map_err(|_| ApiError::bad("bad_id", format!("{id:?} is not an item id")))
}

fn body<T: DeserializeOwned>(
    bytes: Result<Bytes, BytesRejection>,
    limit: usize,
) -> Result<Option<T>, ApiError> {
    let bytes = bytes.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large(limit)
        } else {
            ApiError::bad("bad_body", e.body_text())
        }
    })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| ApiError::bad("bad_body", format!("bad JSON body: {e}")))
}

fn find_queue(admin: &Admin, name: &str) -> Result<Arc<dyn AdminQueue>, ApiError> {
    admin
        .inner
        .queues
        .get(name)
        .cloned()
        .ok_or_else(|| ApiError::not_found(format!("no queue named {name:?}")))
}

async fn page_html() -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                     connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                ),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        ],
        PAGE,
    )
        .into_response()
}

async fn metrics(State(admin): State<Admin>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        admin.render_metrics().await,
    )
        .into_response()
}

async fn overview(State(admin): State<Admin>) -> Json<Overview> {
    Json(admin.overview().await)
}

/// One dead letter as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
struct DeadView {
    id: u64,
    key: Option<String>,
    attempts: u32,
    reason: DeadReason,
    error: String,
    /// The payload decoded as the queue's item type (as JSON), or `null`.
    value: Option<serde_json::Value>,
    /// Why it did not decode.
    decode_error: Option<String>,
    /// The payload as text when it did not decode (lossy UTF-8).
    raw: Option<String>,
}

async fn dead_views(q: &dyn AdminQueue) -> Result<Vec<DeadView>, ApiError> {
    let mut all = q.dead_letters().await.map_err(work_error)?;
    all.sort_by_key(|d| d.id);
    Ok(all
        .into_iter()
        .map(|d| {
            let (value, decode_error, raw) = match q.decode(&d.payload) {
                Ok(v) => (Some(v), None, None),
                Err(e) => (
                    None,
                    Some(e),
                    Some(String::from_utf8_lossy(&d.payload).into_owned()),
                ),
            };
            DeadView {
                id: d.id.0,
                key: d.key,
                attempts: d.attempts,
                reason: d.reason,
                error: d.error,
                value,
                decode_error,
                raw,
            }
        })
        .collect())
}

/// What the event stream sends: the overview and each queue's first dead
/// letters.
#[derive(Serialize)]
struct Live {
    #[serde(flatten)]
    overview: Overview,
    dead: BTreeMap<String, Page<DeadView>>,
}

async fn live(admin: &Admin) -> Live {
    let overview = admin.overview().await;
    let mut dead = BTreeMap::new();
    for (name, q) in &admin.inner.queues {
        if let Ok(all) = dead_views(q.as_ref()).await {
            dead.insert(name.clone(), page(all, 0, LIVE_DEAD));
        }
    }
    Live { overview, dead }
}

async fn events(
    State(admin): State<Admin>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let every = admin.inner.refresh;
    let stream = futures::stream::unfold((admin, true), move |(admin, first)| async move {
        if !first {
            tokio::time::sleep(every).await;
        }
        let event = Event::default()
            .event("overview")
            .json_data(live(&admin).await)
            .unwrap_or_else(|_| Event::default().comment("unencodable figures"));
        Some((Ok(event), (admin, false)))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn servers(State(admin): State<Admin>) -> Json<Vec<collect::ServerView>> {
    Json(admin.overview().await.servers)
}

async fn topics(State(admin): State<Admin>) -> Json<Vec<collect::TopicView>> {
    Json(admin.overview().await.topics)
}

#[derive(Serialize)]
struct TopicDetail {
    #[serde(flatten)]
    topic: collect::TopicView,
    key_list: Page<KeyView>,
}

async fn topic(
    State(admin): State<Admin>,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<Paging>, QueryRejection>,
) -> ApiResult<TopicDetail> {
    let name = path(name)?;
    let (offset, limit) = paging(q)?;
    let unknown = || ApiError::not_found(format!("no topic named {name:?}"));
    let publisher = admin.inner.publisher.as_ref().ok_or_else(unknown)?;
    let stats = publisher.stats();
    let t = stats
        .topics
        .iter()
        .find(|t| t.topic.as_str() == name)
        .ok_or_else(unknown)?;
    let keys = t.keys.iter().map(KeyView::from_stats).collect();
    let view = admin
        .overview()
        .await
        .topics
        .into_iter()
        .find(|t| t.topic == name)
        .ok_or_else(unknown)?;
    Ok(Json(TopicDetail {
        topic: view,
        key_list: page(keys, offset, limit),
    }))
}

#[derive(Serialize)]
struct Pools {
    keyed: Vec<collect::PoolView>,
    lease: Vec<collect::LeasePoolView>,
}

async fn pools(State(admin): State<Admin>) -> Json<Pools> {
    let o = admin.overview().await;
    Json(Pools {
        keyed: o.pools,
        lease: o.lease_pools,
    })
}

async fn queues(State(admin): State<Admin>) -> Json<Vec<QueueView>> {
    let mut out = Vec::new();
    for q in admin.inner.queues.values() {
        out.push(collect::queue_view(q.as_ref()).await);
    }
    Json(out)
}

async fn queue(
    State(admin): State<Admin>,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<QueueView> {
    let q = find_queue(&admin, &path(name)?)?;
    Ok(Json(collect::queue_view(q.as_ref()).await))
}

async fn dead_list(
    State(admin): State<Admin>,
    name: Result<Path<String>, PathRejection>,
    paging_q: Result<Query<Paging>, QueryRejection>,
) -> ApiResult<Page<DeadView>> {
    let q = find_queue(&admin, &path(name)?)?;
    let (offset, limit) = paging(paging_q)?;
    Ok(Json(page(dead_views(q.as_ref()).await?, offset, limit)))
}

async fn dead_show(
    State(admin): State<Admin>,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<DeadView> {
    let (name, id) = path(p)?;
    let q = find_queue(&admin, &name)?;
    let id = parse_id(&id)?;
    dead_views(q.as_ref())
        .await?
        .into_iter()
        .find(|d| d.id == id.0)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no dead letter {} in {name:?}", id.0)))
}

/// How many items an action moved or removed.
#[derive(Debug, Serialize)]
struct Done {
    count: u64,
}

/// What an action does to dead letters.
#[derive(Clone, Copy)]
enum DeadAction {
    Requeue,
    Delete,
}

impl DeadAction {
    /// Applies the action to dead letter `id` of `q`, or to all of them.
    async fn apply(self, q: &dyn AdminQueue, id: Option<ItemId>) -> ApiResult<Done> {
        let count = match self {
            DeadAction::Requeue => q.requeue(id).await,
            DeadAction::Delete => q.delete(id).await,
        }
        .map_err(work_error)?;
        match (id, count) {
            (Some(id), 0) => Err(ApiError::not_found(format!(
                "no dead letter {} in {:?}",
                id.0,
                q.name()
            ))),
            _ => Ok(Json(Done { count })),
        }
    }

    /// The action on one dead letter, named in the path.
    async fn one(
        self,
        admin: &Admin,
        headers: &HeaderMap,
        p: Result<Path<(String, String)>, PathRejection>,
    ) -> ApiResult<Done> {
        authorize(admin, headers)?;
        let (name, id) = path(p)?;
        let q = find_queue(admin, &name)?;
        let id = parse_id(&id)?;
        self.apply(q.as_ref(), Some(id)).await
    }

    /// The action on every dead letter of the queue named in the path.
    async fn all(
        self,
        admin: &Admin,
        headers: &HeaderMap,
        name: Result<Path<String>, PathRejection>,
    ) -> ApiResult<Done> {
        authorize(admin, headers)?;
        let q = find_queue(admin, &path(name)?)?;
        self.apply(q.as_ref(), None).await
    }
}

async fn dead_requeue(
    State(admin): State<Admin>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Done> {
    DeadAction::Requeue.one(&admin, &headers, p).await
}

async fn dead_requeue_all(
    State(admin): State<Admin>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Done> {
    DeadAction::Requeue.all(&admin, &headers, name).await
}

async fn dead_delete(
    State(admin): State<Admin>,
    headers: HeaderMap,
    p: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Done> {
    DeadAction::Delete.one(&admin, &headers, p).await
}

async fn dead_delete_all(
    State(admin): State<Admin>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Done> {
    DeadAction::Delete.all(&admin, &headers, name).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FlushBody {
    timeout_ms: u64,
}

#[derive(Debug, Serialize)]
struct Flushed {
    flushed: bool,
}

async fn flush(
    State(admin): State<Admin>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult<Flushed> {
    authorize(&admin, &headers)?;
    let q = find_queue(&admin, &path(name)?)?;
    let b: Option<FlushBody> = body(bytes, admin.inner.body_limit)?;
    let ms = b.map_or(DEFAULT_FLUSH_MS, |b| b.timeout_ms);
    if ms > MAX_FLUSH_MS {
        return Err(ApiError::bad(
            "out_of_range",
            format!("timeout_ms must be at most {MAX_FLUSH_MS}"),
        ));
    }
    q.flush(Duration::from_millis(ms))
        .await
        .map_err(work_error)?;
    Ok(Json(Flushed { flushed: true }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MaxWorkersBody {
    max_workers: usize,
}

#[derive(Debug, Serialize)]
struct MaxWorkers {
    max_workers: usize,
}

async fn set_max_workers(
    State(admin): State<Admin>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
    bytes: Result<Bytes, BytesRejection>,
) -> ApiResult<MaxWorkers> {
    authorize(&admin, &headers)?;
    let q = find_queue(&admin, &path(name)?)?;
    let b: MaxWorkersBody = body(bytes, admin.inner.body_limit)?
        .ok_or_else(|| ApiError::bad("bad_body", "a body {\"max_workers\": n} is needed"))?;
    if b.max_workers > MAX_WORKERS {
        return Err(ApiError::bad(
            "out_of_range",
            format!("max_workers must be at most {MAX_WORKERS}"),
        ));
    }
    q.set_max_workers(b.max_workers);
    Ok(Json(MaxWorkers {
        max_workers: q.max_workers(),
    }))
}

async fn remove_all(
    State(admin): State<Admin>,
    headers: HeaderMap,
    name: Result<Path<String>, PathRejection>,
) -> ApiResult<Done> {
    authorize(&admin, &headers)?;
    let q = find_queue(&admin, &path(name)?)?;
    let count = q
        .remove_all()
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "backend", error_chain(&e)))?;
    Ok(Json(Done { count }))
}
