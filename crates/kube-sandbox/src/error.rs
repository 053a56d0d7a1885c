//! Kubernetes `Status` errors, shaped like the real API server's (`k8s.io/apimachinery/pkg/api/errors`).

use serde_json::{Value, json};

/// One field-level cause of an `Invalid` error (`details.causes[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Cause {
    /// `FieldValueInvalid`, `FieldValueRequired`, `FieldValueNotSupported`, ...
    pub reason: &'static str,
    /// Field path in the API server's notation, e.g. `spec.routes[0].priority`.
    pub field: String,
    /// Message without the field prefix, e.g. `Invalid value: 101: ... must be ...`.
    pub message: String,
}

impl Cause {
    /// Renders `field: message`, as the server prints one cause.
    pub fn render(&self) -> String {
        if self.field.is_empty() {
            self.message.clone()
        } else {
            format!("{}: {}", self.field, self.message)
        }
    }
}

/// An error answered to a client as a `kind: Status` object.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `StatusReason` (`NotFound`, `Conflict`, ...); empty for an unclassified error.
    pub reason: &'static str,
    /// Human-readable message.
    pub message: String,
    /// `details` object (name, group, kind, causes), or `Value::Null`.
    pub details: Value,
}

/// Group and resource (or kind) used in error messages: `canaries.serin.dev`.
pub fn qualified(resource: &str, group: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

/// `details` naming an object; empty `name` and `group` are left out, as the real server's
/// `omitempty` does.
fn object_details(group: &str, kind: &str, name: &str) -> Value {
    let mut d = json!({"kind": kind});
    if !name.is_empty() {
        d["name"] = json!(name);
    }
    if !group.is_empty() {
        d["group"] = json!(group);
    }
    d
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: String, details: Value) -> Self {
        Self {
            code,
            reason,
            message,
            details,
        }
    }

    /// 404 `<plural>.<group> "name" not found`.
    pub fn not_found(group: &str, plural: &str, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(plural, group)),
            object_details(group, plural, name),
        )
    }

    /// 404 for a path that names no served resource.
    pub fn no_route(path: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            "the server could not find the requested resource".to_string(),
            json!({"causes": [{"reason": "UnexpectedServerResponse", "message": format!("404 page not found: {path}")}]}),
        )
    }

    /// 409 `<plural>.<group> "name" already exists`.
    pub fn already_exists(group: &str, plural: &str, name: &str) -> Self {
        Self::new(
            409,
            "AlreadyExists",
            format!("{} \"{name}\" already exists", qualified(plural, group)),
            object_details(group, plural, name),
        )
    }

    /// 409 optimistic-concurrency conflict.
    pub fn conflict(group: &str, plural: &str, name: &str) -> Self {
        Self::new(
            409,
            "Conflict",
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
                qualified(plural, group)
            ),
            object_details(group, plural, name),
        )
    }

    /// 409 with a custom message about a named object (a failed delete precondition).
    pub fn conflict_message(group: &str, plural: &str, name: &str, message: String) -> Self {
        Self::new(
            409,
            "Conflict",
            message,
            object_details(group, plural, name),
        )
    }

    /// 409 of a server-side apply with conflicts: the real server names no object in
    /// `details`, only the causes.
    pub fn apply_conflict(message: String, causes: Vec<Cause>) -> Self {
        Self::new(
            409,
            "Conflict",
            message,
            json!({"causes": causes_json(&causes)}),
        )
    }

    /// 422 `Kind.group "name" is invalid: field: message` (some checks name the resource
    /// instead of the kind, as the real server does).
    pub fn invalid(group: &str, kind: &str, name: &str, causes: Vec<Cause>) -> Self {
        let rendered: Vec<String> = causes.iter().map(Cause::render).collect();
        let summary = if rendered.len() == 1 {
            rendered[0].clone()
        } else {
            format!("[{}]", rendered.join(", "))
        };
        Self::new(
            422,
            "Invalid",
            format!(
                "{} \"{name}\" is invalid: {summary}",
                qualified(kind, group)
            ),
            {
                let mut d = object_details(group, kind, name);
                d["causes"] = causes_json(&causes);
                d
            },
        )
    }

    /// 422 of a JSON patch that cannot be applied (a failed `test`, a missing path): the real
    /// server answers with this generic message and no details.
    pub fn patch_failed() -> Self {
        Self::new(
            422,
            "Invalid",
            "the server rejected our request due to an error in our request".to_string(),
            Value::Null,
        )
    }

    /// 400 BadRequest.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message.into(), Value::Null)
    }

    /// 405 MethodNotAllowed.
    pub fn method_not_allowed(method: &str, plural: &str, group: &str) -> Self {
        Self::new(
            405,
            "MethodNotAllowed",
            format!(
                "the server does not allow this method on the requested resource ({method} {})",
                qualified(plural, group)
            ),
            Value::Null,
        )
    }

    /// 406 NotAcceptable: the answer cannot take the shape `Accept` asks for.
    pub fn not_acceptable(message: String) -> Self {
        Self::new(406, "NotAcceptable", message, Value::Null)
    }

    /// 415 UnsupportedMediaType: the body is in none of the `accepted` media types.
    pub fn unsupported_media_type(accepted: &[&str]) -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: {}",
                accepted.join(", ")
            ),
            Value::Null,
        )
    }

    /// 415 of a PATCH of a built-in kind in an unknown patch format (the real server's bare
    /// message).
    pub fn unsupported_patch_type() -> Self {
        Self::new(
            415,
            "UnsupportedMediaType",
            "415: Unsupported Media Type".to_string(),
            Value::Null,
        )
    }

    /// 410 Gone: a watch from a resourceVersion older than the kept history; `compacted` is
    /// the newest revision whose events are gone.
    pub fn gone(rv: u64, compacted: u64) -> Self {
        Self::new(
            410,
            "Expired",
            format!("too old resource version: {rv} ({compacted})"),
            Value::Null,
        )
    }

    /// 410 Gone: a continue token older than the kept history.
    pub fn continue_expired() -> Self {
        Self::new(
            410,
            "Expired",
            "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.".to_string(),
            Value::Null,
        )
    }

    /// 410 Gone: a list at an exact resourceVersion older than the kept history.
    pub fn list_expired() -> Self {
        Self::new(
            410,
            "Expired",
            "The resourceVersion for the provided list is too old.".to_string(),
            Value::Null,
        )
    }

    /// 500 of an error the real server does not classify: no `reason`, the bare message.
    pub fn unclassified(message: impl Into<String>) -> Self {
        Self::new(500, "", message.into(), Value::Null)
    }

    /// 500 InternalError.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(
            500,
            "InternalError",
            format!("Internal error occurred: {}", message.into()),
            Value::Null,
        )
    }

    /// The `kind: Status` body.
    pub fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "code": self.code,
        });
        // `reason` is omitempty in the real server's Status.
        if !self.reason.is_empty() {
            status["reason"] = json!(self.reason);
        }
        if !self.details.is_null() {
            status["details"] = self.details.clone();
        }
        status
    }
}

fn causes_json(causes: &[Cause]) -> Value {
    Value::Array(
        causes
            .iter()
            .map(|c| json!({"reason": c.reason, "message": c.message, "field": c.field}))
            .collect(),
    )
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}
