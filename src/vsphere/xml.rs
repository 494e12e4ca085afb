//! A small owned XML tree for SOAP answers: element names without their prefixes, text, the
//! `type` and `xsi:type` attributes, and children, so callers walk it without lifetimes.

/// One element.
#[derive(Clone, Debug, Default)]
pub struct Node {
    /// Local name (`returnval`, `propSet`, ...).
    pub name: String,
    /// Its text (trimmed), for leaf elements.
    pub text: String,
    /// The `type` attribute (a managed object reference's type).
    pub mo_type: Option<String>,
    /// The `xsi:type` attribute (which data object an element holds), without prefix.
    pub xsi_type: Option<String>,
    /// Child elements.
    pub children: Vec<Node>,
}

impl Node {
    /// Parses a document; `Err` carries the parser's reason.
    pub fn parse(text: &str) -> std::result::Result<Node, String> {
        let doc = roxmltree::Document::parse(text).map_err(|e| e.to_string())?;
        Ok(Node::from(doc.root_element()))
    }

    fn from(n: roxmltree::Node<'_, '_>) -> Node {
        let mut xsi_type = None;
        let mut mo_type = None;
        for a in n.attributes() {
            match a.name() {
                "type" if a.namespace().is_some() => {
                    let v = a.value();
                    xsi_type = Some(v.rsplit(':').next().unwrap_or(v).to_string());
                }
                "type" => mo_type = Some(a.value().to_string()),
                _ => {}
            }
        }
        let children: Vec<Node> = n
            .children()
            .filter(|c| c.is_element())
            .map(Node::from)
            .collect();
        let text = if children.is_empty() {
            n.text().unwrap_or("").trim().to_string()
        } else {
            String::new()
        };
        Node {
            name: n.tag_name().name().to_string(),
            text,
            mo_type,
            xsi_type,
            children,
        }
    }

    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }

    /// Every child named `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }

    /// The node at a `/`-separated path of child names.
    pub fn at(&self, path: &str) -> Option<&Node> {
        path.split('/').try_fold(self, |n, p| n.child(p))
    }

    /// The text at `path`, if there is such a node.
    pub fn text_at(&self, path: &str) -> Option<&str> {
        self.at(path).map(|n| n.text.as_str())
    }

    /// The text at `path` as a number.
    pub fn u64_at(&self, path: &str) -> Option<u64> {
        self.text_at(path).and_then(|t| t.parse().ok())
    }
}

/// Escapes text for an element's content.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// `<name>text</name>`, escaped.
pub fn element(name: &str, text: &str) -> String {
    format!("<{name}>{}</{name}>", escape(text))
}

/// `<name type="TYPE">VALUE</name>`: a managed object reference.
pub fn mo_ref(name: &str, mo: &MoRef) -> String {
    format!(
        "<{name} type=\"{}\">{}</{name}>",
        escape(&mo.kind),
        escape(&mo.value)
    )
}

/// A managed object reference: its type and its id on the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MoRef {
    /// `VirtualMachine`, `Task`, `VirtualMachineSnapshot`, ...
    pub kind: String,
    /// `vm-42`, `task-7`, ...
    pub value: String,
}

impl MoRef {
    /// A reference of `kind` to `value`.
    pub fn new(kind: &str, value: &str) -> MoRef {
        MoRef {
            kind: kind.into(),
            value: value.into(),
        }
    }

    /// The reference an element holds (its `type` attribute and text).
    pub fn of(n: &Node) -> Option<MoRef> {
        let kind = n.mo_type.clone()?;
        (!n.text.is_empty()).then(|| MoRef {
            kind,
            value: n.text.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_references_and_types() {
        let doc = r#"<soapenv:Envelope xmlns:soapenv="http://schemas.xmlsoap.org/soap/envelope/"
            xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance"><soapenv:Body>
            <R xmlns="urn:vim25"><returnval type="Task">task-7</returnval>
            <val xsi:type="ArrayOfString"><string>a &amp; b</string></val></R>
            </soapenv:Body></soapenv:Envelope>"#;
        let n = Node::parse(doc).unwrap();
        let r = n.at("Body/R").unwrap();
        assert_eq!(
            MoRef::of(r.child("returnval").unwrap()),
            Some(MoRef::new("Task", "task-7"))
        );
        let v = r.child("val").unwrap();
        assert_eq!(v.xsi_type.as_deref(), Some("ArrayOfString"));
        assert_eq!(v.text_at("string"), Some("a & b"));
        assert_eq!(escape("<a&'\">"), "&lt;a&amp;&apos;&quot;&gt;");
    }
}
