//! The CNI configuration files that keyway joins, read the way runtimes read them (libcni's rules,
//! as kubelet and containerd apply them), and the edits keyway makes to them. Pure functions over
//! bytes and JSON: the directory side lives in `confdir`.

use serde_json::{Map, Value};

/// The `type` of keyway's entry (the plugin binary's name in the CNI bin dir).
pub const KEYWAY_TYPE: &str = "keyway";
/// The `type` of Istio's CNI plugin, which keyway follows when both are in a chain.
pub const ISTIO_TYPE: &str = "istio-cni";

#[derive(Debug, thiserror::Error)]
pub enum ConfError {
    #[error("{file}: not JSON: {source}")]
    Json {
        file: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{file}: {reason}")]
    Invalid { file: String, reason: String },
}

/// A single-plugin `.conf`/`.json`, or a `.conflist`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Conf,
    ConfList,
}

/// The extensions runtimes read, and what each holds.
pub fn kind_of(file_name: &str) -> Option<Kind> {
    match file_name.rsplit_once('.').map(|(_, e)| e) {
        Some("conflist") => Some(Kind::ConfList),
        Some("conf" | "json") => Some(Kind::Conf),
        _ => None,
    }
}

/// A configuration file that a runtime would accept.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigFile {
    pub kind: Kind,
    pub value: Value,
}

fn string_field<'a>(m: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    m.get(k).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Parses `bytes` as the file `file_name`, with libcni's checks: a conflist needs a name and a
/// non-empty list of plugins that each have a type; a conf needs a type.
pub fn parse(file_name: &str, bytes: &[u8]) -> Result<ConfigFile, ConfError> {
    let invalid = |reason: &str| ConfError::Invalid {
        file: file_name.to_string(),
        reason: reason.to_string(),
    };
    let kind = kind_of(file_name).ok_or_else(|| invalid("not a .conf, .conflist or .json file"))?;
    let value: Value = serde_json::from_slice(bytes).map_err(|source| ConfError::Json {
        file: file_name.to_string(),
        source,
    })?;
    let obj = value
        .as_object()
        .ok_or_else(|| invalid("not a JSON object"))?;
    match kind {
        Kind::ConfList => {
            string_field(obj, "name").ok_or_else(|| invalid("a conflist needs a name"))?;
            let plugins = obj
                .get("plugins")
                .and_then(Value::as_array)
                .filter(|p| !p.is_empty())
                .ok_or_else(|| invalid("a conflist needs a non-empty list of plugins"))?;
            for p in plugins {
                p.as_object()
                    .and_then(|p| string_field(p, "type"))
                    .ok_or_else(|| invalid("every plugin needs a type"))?;
            }
        }
        Kind::Conf => {
            string_field(obj, "type").ok_or_else(|| invalid("a conf needs a type"))?;
        }
    }
    Ok(ConfigFile { kind, value })
}

fn plugins(list: &Value) -> &[Value] {
    list.get("plugins")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn type_of(plugin: &Value) -> Option<&str> {
    plugin.get("type").and_then(Value::as_str)
}

impl ConfigFile {
    /// The file as a conflist: a `.conf` becomes a list of one plugin, as libcni's
    /// `ConfListFromConf` makes it (the network's cniVersion and name at the top, the plugin kept
    /// whole).
    pub fn into_list(self) -> Value {
        match self.kind {
            Kind::ConfList => self.value,
            Kind::Conf => {
                let mut list = Map::new();
                if let Some(v) = self.value.get("cniVersion") {
                    list.insert("cniVersion".into(), v.clone());
                }
                if let Some(v) = self.value.get("name") {
                    list.insert("name".into(), v.clone());
                }
                list.insert("plugins".into(), Value::Array(vec![self.value]));
                Value::Object(list)
            }
        }
    }

    /// Whether a runtime would see a primary network here: at least one plugin not keyway's.
    pub fn has_primary(&self) -> bool {
        match self.kind {
            Kind::Conf => type_of(&self.value) != Some(KEYWAY_TYPE),
            Kind::ConfList => plugins(&self.value)
                .iter()
                .any(|p| type_of(p) != Some(KEYWAY_TYPE)),
        }
    }
}

/// Whether a conflist holds a keyway entry.
pub fn has_keyway(list: &Value) -> bool {
    plugins(list)
        .iter()
        .any(|p| type_of(p) == Some(KEYWAY_TYPE))
}

/// Whether keyway's entry is in place: exactly once, equal to `entry`, and last — which puts it
/// after the primary and after istio-cni, and keeps the primary's other plugins (portmap,
/// bandwidth) from seeing keyway's overlay addresses in the result they are given.
pub fn is_in_place(list: &Value, entry: &Value) -> bool {
    let p = plugins(list);
    p.iter().filter(|p| type_of(p) == Some(KEYWAY_TYPE)).count() == 1 && p.last() == Some(entry)
}

/// `list` without keyway's entries.
pub fn without_keyway(list: &Value) -> Value {
    let mut out = list.clone();
    if let Some(p) = out.get_mut("plugins").and_then(Value::as_array_mut) {
        p.retain(|p| type_of(p) != Some(KEYWAY_TYPE));
    }
    out
}

/// `list` with keyway's entry in place (see [`is_in_place`]); the list's cniVersion is kept.
pub fn with_keyway(list: &Value, entry: &Value) -> Value {
    let mut out = without_keyway(list);
    if let Some(p) = out.get_mut("plugins").and_then(Value::as_array_mut) {
        p.push(entry.clone());
    }
    out
}

/// Checks an operator's keyway entry: an object of type keyway, without the list-level fields
/// that belong to the primary's conflist.
pub fn validate_entry(entry: &Value) -> Result<(), String> {
    let obj = entry
        .as_object()
        .ok_or("the keyway entry must be a JSON object")?;
    if type_of(entry) != Some(KEYWAY_TYPE) {
        return Err(format!(
            "the keyway entry must have \"type\": \"{KEYWAY_TYPE}\""
        ));
    }
    for k in ["cniVersion", "name", "plugins", "prevResult"] {
        if obj.contains_key(k) {
            return Err(format!(
                "the keyway entry must not set {k:?}: the primary's conflist decides it"
            ));
        }
    }
    Ok(())
}

/// The bytes keyway writes: two-space indented JSON and a final newline.
pub fn render(v: &Value) -> Vec<u8> {
    let mut out = serde_json::to_vec_pretty(v).expect("a Value always serializes");
    out.push(b'\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn libcni_rules_decide_what_is_valid() {
        assert!(
            parse(
                "a.conflist",
                br#"{"name":"n","plugins":[{"type":"bridge"}]}"#
            )
            .is_ok()
        );
        for (f, b, why) in [
            ("a.conflist", &br#"{"plugins":[{"type":"x"}]}"#[..], "name"),
            ("a.conflist", br#"{"name":"n","plugins":[]}"#, "non-empty"),
            ("a.conflist", br#"{"name":"n","plugins":[{}]}"#, "type"),
            ("a.conf", br#"{"name":"n"}"#, "type"),
            ("a.conf", br#"[1]"#, "object"),
            ("a.txt", br#"{}"#, ".conf"),
        ] {
            let e = parse(f, b).unwrap_err().to_string();
            assert!(e.contains(why) && e.starts_with(f), "{f}: {e}");
        }
        let e = parse("a.conf", b"{").unwrap_err().to_string();
        assert!(e.contains("not JSON"), "{e}");
    }

    #[test]
    fn a_conf_becomes_a_list_of_one() {
        let conf = parse(
            "10-x.conf",
            br#"{"cniVersion":"0.3.1","name":"mynet","type":"bridge","bridge":"cni0"}"#,
        )
        .unwrap();
        let list = conf.into_list();
        assert_eq!(list["cniVersion"], "0.3.1");
        assert_eq!(list["name"], "mynet");
        assert_eq!(list["plugins"][0]["bridge"], "cni0");
        assert_eq!(
            serde_json::to_string(&list).unwrap(),
            r#"{"cniVersion":"0.3.1","name":"mynet","plugins":[{"cniVersion":"0.3.1","name":"mynet","type":"bridge","bridge":"cni0"}]}"#,
            "keys keep their order"
        );
    }

    #[test]
    fn keyway_goes_last_once_and_comes_out_cleanly() {
        let entry = json!({"type": "keyway"});
        let list = json!({"cniVersion": "1.0.0", "name": "k", "plugins": [
            {"type": "calico"}, {"type": "keyway", "old": true}, {"type": "portmap"}, {"type": "istio-cni"}
        ]});
        assert!(!is_in_place(&list, &entry));
        let placed = with_keyway(&list, &entry);
        assert!(is_in_place(&placed, &entry));
        let types: Vec<_> = plugins(&placed).iter().filter_map(type_of).collect();
        assert_eq!(types, ["calico", "portmap", "istio-cni", "keyway"]);
        assert_eq!(placed["cniVersion"], "1.0.0");
        assert!(!has_keyway(&without_keyway(&placed)));
        assert!(!is_in_place(
            &with_keyway(&list, &json!({"type": "keyway", "mtu": 1400})),
            &entry
        ));
    }

    #[test]
    fn entries_are_checked() {
        assert!(validate_entry(&json!({"type": "keyway", "mtu": 1400})).is_ok());
        assert!(validate_entry(&json!({"type": "bridge"})).is_err());
        assert!(validate_entry(&json!({"type": "keyway", "cniVersion": "1.0.0"})).is_err());
        assert!(validate_entry(&json!("keyway")).is_err());
    }
}
