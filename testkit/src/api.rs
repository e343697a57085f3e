//! An in-memory Kubernetes API behind a real [`kube::Client`]: enough of the API
//! server's object semantics for the controller's own requests (get, create, delete,
//! server-side apply as a whole-object write, merge and JSON patches, the status
//! subresource, finalizers and deletion), so unit tests run a pass without a server.
//!
//! It is not a validating API server (the api tier has the real one): no schemas, no
//! field ownership, no watches. Every request is recorded, and any request can be made
//! to fail with an HTTP status ([`FakeApi::fail`]).

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use kube::client::Body;
use kube::{Client, Resource};
use parking_lot::{Mutex, MutexGuard};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// One request the controller made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub method: Method,
    /// Path without the query.
    pub path: String,
}

#[derive(Debug, Default)]
struct State {
    /// Object path (`/api/v1/namespaces/ns/secrets/name`) -> object.
    objects: BTreeMap<String, Value>,
    requests: Vec<Recorded>,
    /// (method, path fragment, status): a matching request gets that status.
    failing: Vec<(Method, String, u16)>,
    resource_version: u64,
}

/// The fake API server. Clones share one store.
#[derive(Debug, Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock()
    }

    /// A client whose every request this fake answers (default namespace `default`).
    pub fn client(&self) -> Client {
        let api = self.clone();
        let service = tower::service_fn(move |request: Request<Body>| {
            let api = api.clone();
            async move { Ok::<_, Infallible>(api.handle(request).await) }
        });
        Client::new(service, "default")
    }

    /// Stores an object as if created by someone else (uid and resourceVersion given).
    pub fn put<K>(&self, object: &K)
    where
        K: Resource<DynamicType = ()> + Serialize,
    {
        let namespace = object.meta().namespace.clone().unwrap_or_default();
        let name = object.meta().name.clone().unwrap_or_default();
        let path = format!("{}/{name}", K::url_path(&(), Some(&namespace)));
        let mut value = serde_json::to_value(object).unwrap_or(Value::Null);
        value["apiVersion"] = json!(K::api_version(&()));
        value["kind"] = json!(K::kind(&()));
        let mut state = self.state();
        stamp_created(&mut state, &mut value);
        state.objects.insert(path, value);
    }

    /// The stored object, if any.
    pub fn get<K>(&self, namespace: &str, name: &str) -> Option<K>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
    {
        let path = format!("{}/{name}", K::url_path(&(), Some(namespace)));
        let value = self.state().objects.get(&path).cloned()?;
        serde_json::from_value(value).ok()
    }

    /// Every stored object of the kind in the namespace.
    pub fn list<K>(&self, namespace: &str) -> Vec<K>
    where
        K: Resource<DynamicType = ()> + DeserializeOwned,
    {
        let prefix = format!("{}/", K::url_path(&(), Some(namespace)));
        self.state()
            .objects
            .iter()
            .filter(|(path, _)| path.starts_with(&prefix) && !path[prefix.len()..].contains('/'))
            .filter_map(|(_, v)| serde_json::from_value(v.clone()).ok())
            .collect()
    }

    /// Reasons of the Events published in the namespace, in the order they were made.
    pub fn event_reasons(&self, namespace: &str) -> Vec<String> {
        let prefix = format!("/apis/events.k8s.io/v1/namespaces/{namespace}/events/");
        let state = self.state();
        let mut events: Vec<(u64, String)> = state
            .objects
            .iter()
            .filter(|(path, _)| path.starts_with(&prefix))
            .map(|(_, v)| {
                let rv = v["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|rv| rv.parse().ok())
                    .unwrap_or(0);
                (rv, v["reason"].as_str().unwrap_or_default().to_owned())
            })
            .collect();
        events.sort();
        events.into_iter().map(|(_, reason)| reason).collect()
    }

    /// Removes an object behind the controller's back.
    pub fn delete<K>(&self, namespace: &str, name: &str)
    where
        K: Resource<DynamicType = ()>,
    {
        let path = format!("{}/{name}", K::url_path(&(), Some(namespace)));
        self.state().objects.remove(&path);
    }

    /// Every request made so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state().requests.clone()
    }

    /// Requests made with `method` to a path containing `fragment`.
    pub fn count(&self, method: &Method, fragment: &str) -> usize {
        self.state()
            .requests
            .iter()
            .filter(|r| r.method == *method && r.path.contains(fragment))
            .count()
    }

    /// Makes every request with `method` to a path containing `fragment` answer
    /// `status` (for example 500), until [`FakeApi::heal`].
    pub fn fail(&self, method: Method, fragment: &str, status: u16) {
        self.state()
            .failing
            .push((method, fragment.to_owned(), status));
    }

    pub fn heal(&self) {
        self.state().failing.clear();
    }

    async fn handle(&self, request: Request<Body>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let body = match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(error) => return status(400, "BadRequest", &error.to_string()),
        };
        let path = parts.uri.path().to_owned();
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let mut state = self.state();
        state.requests.push(Recorded {
            method: parts.method.clone(),
            path: path.clone(),
        });
        if let Some((_, _, code)) = state
            .failing
            .iter()
            .find(|(m, fragment, _)| *m == parts.method && path.contains(fragment.as_str()))
        {
            let reason = match code {
                404 => "NotFound",
                409 => "Conflict",
                429 => "TooManyRequests",
                _ => "InternalError",
            };
            return status(*code, reason, "injected failure");
        }
        let body: Value = if body.is_empty() {
            Value::Null
        } else {
            match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(error) => return status(400, "BadRequest", &error.to_string()),
            }
        };
        let (object_path, subresource) = match path.strip_suffix("/status") {
            Some(parent) => (parent.to_owned(), true),
            None => (path.clone(), false),
        };
        match parts.method {
            Method::GET => match state.objects.get(&object_path) {
                Some(object) if subresource || !is_collection(&path) => ok(object),
                _ if is_collection(&path) => {
                    let prefix = format!("{path}/");
                    let items: Vec<&Value> = state
                        .objects
                        .iter()
                        .filter(|(p, _)| p.starts_with(&prefix) && !p[prefix.len()..].contains('/'))
                        .map(|(_, v)| v)
                        .collect();
                    ok(&json!({"kind": "List", "apiVersion": "v1", "metadata": {}, "items": items}))
                }
                _ => not_found(&path),
            },
            Method::POST => {
                let mut object = body;
                let name = match object["metadata"]["name"].as_str() {
                    Some(name) => name.to_owned(),
                    None => {
                        let prefix = object["metadata"]["generateName"]
                            .as_str()
                            .unwrap_or("object-")
                            .to_owned();
                        let name = format!("{prefix}{}", state.resource_version + 1);
                        object["metadata"]["name"] = json!(name);
                        name
                    }
                };
                let item = format!("{path}/{name}");
                if state.objects.contains_key(&item) {
                    return status(409, "AlreadyExists", &format!("{item} already exists"));
                }
                stamp_created(&mut state, &mut object);
                state.objects.insert(item, object.clone());
                respond(201, &object)
            }
            Method::PATCH => {
                let existing = state.objects.get(&object_path).cloned();
                let patched = match (content_type.as_str(), existing) {
                    ("application/apply-patch+yaml", existing) => {
                        Ok(apply(existing, body, subresource))
                    }
                    ("application/merge-patch+json", Some(mut object))
                    | ("application/strategic-merge-patch+json", Some(mut object)) => {
                        json_patch::merge(&mut object, &body);
                        Ok(object)
                    }
                    ("application/json-patch+json", Some(mut object)) => {
                        // The API server tests an absent field as null (kube's finalizer
                        // helper relies on it).
                        if object["metadata"].get("finalizers").is_none() {
                            object["metadata"]["finalizers"] = Value::Null;
                        }
                        match serde_json::from_value::<json_patch::Patch>(body) {
                            Ok(patch) => json_patch::patch(&mut object, &patch)
                                .map(|()| object)
                                .map_err(|e| status(422, "Invalid", &e.to_string())),
                            Err(e) => Err(status(400, "BadRequest", &e.to_string())),
                        }
                    }
                    (_, None) => Err(not_found(&path)),
                    (other, Some(_)) => Err(status(415, "UnsupportedMediaType", other)),
                };
                match patched {
                    Ok(mut object) => {
                        state.resource_version += 1;
                        object["metadata"]["resourceVersion"] =
                            json!(state.resource_version.to_string());
                        if object["metadata"]["uid"].is_null() {
                            stamp_created(&mut state, &mut object);
                        }
                        let gone = finalized(&object);
                        if gone {
                            state.objects.remove(&object_path);
                        } else {
                            state.objects.insert(object_path, object.clone());
                        }
                        ok(&object)
                    }
                    Err(response) => response,
                }
            }
            Method::DELETE => match state.objects.get(&object_path).cloned() {
                None => not_found(&path),
                Some(mut object) => {
                    let has_finalizers = object["metadata"]["finalizers"]
                        .as_array()
                        .is_some_and(|f| !f.is_empty());
                    if has_finalizers {
                        object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                        state.objects.insert(object_path, object.clone());
                        ok(&object)
                    } else {
                        state.objects.remove(&object_path);
                        ok(&json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}))
                    }
                }
            },
            _ => status(405, "MethodNotAllowed", parts.method.as_str()),
        }
    }
}

/// Server-side apply as a whole-object write by the one manager: the applied fields
/// replace the stored ones (the status alone through the subresource).
fn apply(existing: Option<Value>, patch: Value, subresource: bool) -> Value {
    match existing {
        None => patch,
        Some(mut object) if subresource => {
            object["status"] = patch["status"].clone();
            object
        }
        Some(mut object) => {
            let metadata = object["metadata"].clone();
            if let (Value::Object(target), Value::Object(source)) = (&mut object, patch) {
                for (key, value) in source {
                    target.insert(key, value);
                }
            }
            // What the server owns stays.
            for key in ["uid", "creationTimestamp", "deletionTimestamp"] {
                if !metadata[key].is_null() {
                    object["metadata"][key] = metadata[key].clone();
                }
            }
            object
        }
    }
}

fn is_collection(path: &str) -> bool {
    // /api/v1/namespaces/{ns}/{plural} or /apis/{group}/{version}/namespaces/{ns}/{plural}
    let segments = path.trim_start_matches('/').split('/').count();
    (path.starts_with("/api/") && segments == 5) || (path.starts_with("/apis/") && segments == 6)
}

/// Whether a deleted object lost its last finalizer, so it is gone.
fn finalized(object: &Value) -> bool {
    !object["metadata"]["deletionTimestamp"].is_null()
        && object["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty())
}

fn stamp_created(state: &mut State, object: &mut Value) {
    state.resource_version += 1;
    let rv = state.resource_version;
    let metadata = &mut object["metadata"];
    if metadata["uid"].is_null() {
        metadata["uid"] = json!(format!("00000000-0000-4000-8000-{rv:012}"));
    }
    metadata["resourceVersion"] = json!(rv.to_string());
    if metadata["creationTimestamp"].is_null() {
        metadata["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    if metadata["generation"].is_null() {
        metadata["generation"] = json!(1);
    }
}

fn ok(value: &Value) -> Response<Full<Bytes>> {
    respond(200, value)
}

fn respond(code: u16, value: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

fn not_found(path: &str) -> Response<Full<Bytes>> {
    status(404, "NotFound", &format!("{path} not found"))
}

fn status(code: u16, reason: &str, message: &str) -> Response<Full<Bytes>> {
    respond(
        code,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code,
        }),
    )
}
