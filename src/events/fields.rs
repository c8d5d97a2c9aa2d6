//! [`Fields`]: an event's type-specific fields, shared by every subscriber of the event, together
//! with the event's JSON object as the bus rendered it for the audit log.
//!
//! How it works:
//! 1. The bus renders each event it publishes once, under its lock: that text, plus a newline,
//!    is the event's log line. When the event has subscribers, it keeps the text beside the
//!    fields (`rendered`), shared with the writer thread, so that the JS stream hands them those
//!    same bytes (`Event::write_line`) instead of serializing the event again.
//! 2. An event of a [`TypedFields`](super::TypedFields) type is published from its text alone:
//!    no map of owned names and values is built on that hot path (`egress.request` and
//!    `egress.response`, once per proxied request each). The map is parsed from the text the
//!    first time someone reads the fields (a Rust subscriber, a test); a typed event's field
//!    names never collide with the header fields, so taking those out of the parsed object
//!    leaves exactly the fields.
//! 3. Every other event keeps its map from the start; its text is only a cache.

use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};

use super::{FIELD_ID, FIELD_SANDBOX, FIELD_TIME, FIELD_TYPE};

/// The type-specific fields of an [`Event`](super::Event) (camelCase names, as JS sees them),
/// read as a [`Map`] through `Deref`. Cloning shares them: every subscriber of an event gets
/// the same fields.
#[derive(Clone, Default)]
pub struct Fields(Arc<Repr>);

#[derive(Default)]
struct Repr {
    /// Set from the start, or parsed from `rendered` on first use.
    map: OnceLock<Map<String, Value>>,
    /// The whole event as the bus rendered it (its log line without the newline).
    rendered: Option<Arc<[u8]>>,
}

impl Fields {
    /// Fields known only from the event's rendered JSON object (see the module docs, step 2).
    /// The object's field names must not include a header field's.
    pub(super) fn from_rendered(rendered: Arc<[u8]>) -> Fields {
        Fields(Arc::new(Repr {
            map: OnceLock::new(),
            rendered: Some(rendered),
        }))
    }

    /// The same fields, with the event's rendered JSON object kept beside them.
    pub(super) fn with_rendered(self, rendered: Arc<[u8]>) -> Fields {
        let map = self.into_map();
        Fields(Arc::new(Repr {
            map: OnceLock::from(map),
            rendered: Some(rendered),
        }))
    }

    /// The event as the bus rendered it, if it did.
    pub(super) fn rendered(&self) -> Option<&[u8]> {
        self.0.rendered.as_deref()
    }

    /// Whether the map exists yet (built, or parsed from the rendering).
    #[cfg(test)]
    pub(super) fn is_parsed(&self) -> bool {
        self.0.map.get().is_some()
    }

    /// The map, without a copy when no one else holds these fields.
    pub fn into_map(self) -> Map<String, Value> {
        match Arc::try_unwrap(self.0) {
            Ok(repr) => match repr.map.into_inner() {
                Some(map) => map,
                None => repr.rendered.as_deref().map(parse).unwrap_or_default(),
            },
            Err(shared) => Fields(shared).as_map().clone(),
        }
    }

    fn as_map(&self) -> &Map<String, Value> {
        self.0
            .map
            .get_or_init(|| self.0.rendered.as_deref().map(parse).unwrap_or_default())
    }
}

/// The fields of a rendered event: its object without the header fields. Empty if it does not
/// parse, which the bus's own rendering never causes.
fn parse(rendered: &[u8]) -> Map<String, Value> {
    let mut map: Map<String, Value> = serde_json::from_slice(rendered).unwrap_or_default();
    for header in [FIELD_ID, FIELD_SANDBOX, FIELD_TIME, FIELD_TYPE] {
        map.remove(header);
    }
    map
}

impl std::ops::Deref for Fields {
    type Target = Map<String, Value>;

    fn deref(&self) -> &Map<String, Value> {
        self.as_map()
    }
}

impl From<Map<String, Value>> for Fields {
    fn from(map: Map<String, Value>) -> Fields {
        Fields(Arc::new(Repr {
            map: OnceLock::from(map),
            rendered: None,
        }))
    }
}

/// Equal when the maps are: how the fields are held does not matter.
impl PartialEq for Fields {
    fn eq(&self, other: &Fields) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.as_map() == other.as_map()
    }
}

impl std::fmt::Debug for Fields {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.as_map().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn fields_parsed_from_a_rendering_leave_out_the_header() {
        let rendered = br#"{"host":"h","id":"0000000000000001","port":80,"sandbox":"sb","time":"t","type":"egress.request"}"#;
        let fields = Fields::from_rendered(rendered.as_slice().into());
        assert_eq!(
            Value::Object((*fields).clone()),
            json!({ "host": "h", "port": 80 })
        );
        assert_eq!(fields.rendered(), Some(rendered.as_slice()));
        assert_eq!(
            fields,
            Fields::from(
                json!({ "host": "h", "port": 80 })
                    .as_object()
                    .cloned()
                    .unwrap()
            )
        );
        assert_eq!(fields.clone().into_map().len(), 2, "shared");
        assert_eq!(fields.into_map().len(), 2, "owned");
    }

    #[test]
    fn a_rendering_that_does_not_parse_has_no_fields() {
        assert!(Fields::from_rendered(b"{".as_slice().into()).is_empty());
        assert!(Fields::from_rendered(b"[1]".as_slice().into())
            .into_map()
            .is_empty());
    }
}
