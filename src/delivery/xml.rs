//! The `xml(text)` helper of transforms (`transform.rs`): an XML or SOAP
//! document as the object a script gets (quick-xml): elements by local
//! name (namespace prefixes dropped), attributes as `@name`, repeated
//! elements as arrays, text as the value (or `#text` beside attributes).

/// XML to the object `xml(text)` returns, as JSON text (an error as
/// `{"error": ...}`: the script sees it and decides).
pub(super) fn xml_to_json(text: &str) -> String {
    match xml_value(text) {
        Ok(v) => v.to_string(),
        Err(e) => serde_json::json!({ "error": e }).to_string(),
    }
}

fn xml_value(text: &str) -> Result<serde_json::Value, String> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(text);
    reader.config_mut().trim_text(true);
    // A stack of (local name, object, text) for open elements.
    let mut stack: Vec<(String, serde_json::Map<String, serde_json::Value>, String)> =
        vec![(String::new(), serde_json::Map::new(), String::new())];
    let mut depth = 0usize;
    loop {
        match reader.read_event().map_err(|e| format!("not XML: {e}"))? {
            Event::Start(e) => {
                depth += 1;
                if depth > 256 {
                    return Err("XML nested deeper than 256 levels".to_string());
                }
                let (name, attrs) = element(&e)?;
                stack.push((name, attrs, String::new()));
            }
            Event::Empty(e) => {
                let (name, attrs) = element(&e)?;
                let parent = stack.last_mut().ok_or("unbalanced XML")?;
                insert(&mut parent.1, name, finish(attrs, String::new()));
            }
            Event::Text(t) => {
                let s = t.unescape().map_err(|e| format!("not XML: {e}"))?;
                if let Some(top) = stack.last_mut() {
                    top.2.push_str(&s);
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.2.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::End(_) => {
                depth = depth.saturating_sub(1);
                let (name, obj, text) = stack.pop().ok_or("unbalanced XML")?;
                let parent = stack.last_mut().ok_or("unbalanced XML")?;
                insert(&mut parent.1, name, finish(obj, text));
            }
            Event::Eof => break,
            _ => {}
        }
    }
    let (_, root, _) = stack.pop().ok_or("empty XML")?;
    if !stack.is_empty() {
        return Err("unbalanced XML".to_string());
    }
    Ok(serde_json::Value::Object(root))
}

fn element(
    e: &quick_xml::events::BytesStart<'_>,
) -> Result<(String, serde_json::Map<String, serde_json::Value>), String> {
    let name = String::from_utf8_lossy(e.local_name().as_ref()).into_owned();
    let mut attrs = serde_json::Map::new();
    for a in e.attributes() {
        let a = a.map_err(|e| format!("not XML: {e}"))?;
        let key = format!("@{}", String::from_utf8_lossy(a.key.local_name().as_ref()));
        let value = a.unescape_value().map_err(|e| format!("not XML: {e}"))?.into_owned();
        attrs.insert(key, serde_json::Value::String(value));
    }
    Ok((name, attrs))
}

fn finish(mut obj: serde_json::Map<String, serde_json::Value>, text: String) -> serde_json::Value {
    if obj.is_empty() {
        return serde_json::Value::String(text);
    }
    if !text.is_empty() {
        obj.insert("#text".into(), serde_json::Value::String(text));
    }
    serde_json::Value::Object(obj)
}

fn insert(obj: &mut serde_json::Map<String, serde_json::Value>, name: String, value: serde_json::Value) {
    match obj.get_mut(&name) {
        None => {
            obj.insert(name, value);
        }
        Some(serde_json::Value::Array(items)) => items.push(value),
        Some(existing) => {
            let first = existing.take();
            *existing = serde_json::Value::Array(vec![first, value]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xml_becomes_an_object() {
        let soap = r#"<?xml version="1.0"?><soap:Envelope xmlns:soap="http://schemas.xmlsoap.org/soap/envelope/"><soap:Body><CallbackRequest><requestId>r-9</requestId><device kind="4G"><id>A1</id></device><device><id>A2</id></device></CallbackRequest></soap:Body></soap:Envelope>"#;
        let v: serde_json::Value = serde_json::from_str(&xml_to_json(soap)).expect("json");
        let req = &v["Envelope"]["Body"]["CallbackRequest"];
        assert_eq!(req["requestId"], "r-9");
        assert_eq!(req["device"][0]["@kind"], "4G");
        assert_eq!(req["device"][1]["id"], "A2");
        assert!(xml_to_json("<a><b></a>").contains("error"));
    }
}
