//! Selectors: Kubernetes label selectors (matchLabels + matchExpressions) and Calico's selector
//! expressions (`app == 'x' && has(tier)`), behind one [`Selector`] type.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector as K8sLabelSelector;

use crate::{error::FieldError, inventory::Labels};

#[derive(Clone, Debug, PartialEq)]
pub enum Selector {
    Label(LabelSelector),
    Calico(CalicoExpr),
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        match self {
            Selector::Label(s) => s.matches(labels),
            Selector::Calico(e) => e.matches(labels),
        }
    }

    pub fn everything() -> Selector {
        Selector::Label(LabelSelector::default())
    }

    pub fn is_everything(&self) -> bool {
        match self {
            Selector::Label(s) => s.reqs.is_empty(),
            Selector::Calico(CalicoExpr::All) => true,
            Selector::Calico(_) => false,
        }
    }
}

impl std::fmt::Display for Selector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Selector::Label(s) => s.fmt(f),
            Selector::Calico(e) => e.fmt(f),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub op: Op,
    pub values: Vec<String>,
}

/// A label selector: all requirements must hold; none selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LabelSelector {
    pub reqs: Vec<Requirement>,
}

impl LabelSelector {
    /// Converts the API type, validating operators and values as the API server does. `at` is the
    /// field path for messages.
    pub fn from_k8s(sel: &K8sLabelSelector, at: &str) -> Result<LabelSelector, FieldError> {
        let mut reqs = Vec::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            reqs.push(Requirement { key: k.clone(), op: Op::In, values: vec![v.clone()] });
        }
        for (i, e) in sel.match_expressions.iter().flatten().enumerate() {
            let op = match e.operator.as_str() {
                "In" => Op::In,
                "NotIn" => Op::NotIn,
                "Exists" => Op::Exists,
                "DoesNotExist" => Op::DoesNotExist,
                other => {
                    return Err(FieldError::new(
                        format!("{at}.matchExpressions[{i}].operator"),
                        format!("`{other}` is not one of In, NotIn, Exists, DoesNotExist"),
                    ));
                }
            };
            let values = e.values.clone().unwrap_or_default();
            match op {
                Op::In | Op::NotIn if values.is_empty() => {
                    return Err(FieldError::new(
                        format!("{at}.matchExpressions[{i}].values"),
                        format!("`{}` needs at least one value", e.operator),
                    ));
                }
                Op::Exists | Op::DoesNotExist if !values.is_empty() => {
                    return Err(FieldError::new(
                        format!("{at}.matchExpressions[{i}].values"),
                        format!("`{}` takes no values", e.operator),
                    ));
                }
                _ => {}
            }
            reqs.push(Requirement { key: e.key.clone(), op, values });
        }
        Ok(LabelSelector { reqs })
    }

    pub fn equals(pairs: &[(&str, &str)]) -> LabelSelector {
        LabelSelector {
            reqs: pairs
                .iter()
                .map(|(k, v)| Requirement { key: k.to_string(), op: Op::In, values: vec![v.to_string()] })
                .collect(),
        }
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.reqs.iter().all(|r| {
            let v = labels.get(&r.key);
            match r.op {
                Op::In => v.is_some_and(|v| r.values.contains(v)),
                Op::NotIn => v.is_none_or(|v| !r.values.contains(v)),
                Op::Exists => v.is_some(),
                Op::DoesNotExist => v.is_none(),
            }
        })
    }

    /// The value this selector pins `key` to, if it does (`key In [one]`).
    pub fn pinned(&self, key: &str) -> Option<&str> {
        self.reqs.iter().find(|r| r.key == key && r.op == Op::In && r.values.len() == 1).map(|r| r.values[0].as_str())
    }
}

impl std::fmt::Display for LabelSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.reqs.is_empty() {
            return f.write_str("{} (all)");
        }
        let parts: Vec<String> = self
            .reqs
            .iter()
            .map(|r| match r.op {
                Op::In if r.values.len() == 1 => format!("{}={}", r.key, r.values[0]),
                Op::In => format!("{} in ({})", r.key, r.values.join(",")),
                Op::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
                Op::Exists => r.key.clone(),
                Op::DoesNotExist => format!("!{}", r.key),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

/// A Calico selector expression.
#[derive(Clone, Debug, PartialEq)]
pub enum CalicoExpr {
    All,
    /// `global()`: non-namespaced endpoints (host endpoints); matches no pod.
    Global,
    Has(String),
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    StartsWith(String, String),
    EndsWith(String, String),
    Contains(String, String),
    Not(Box<CalicoExpr>),
    And(Box<CalicoExpr>, Box<CalicoExpr>),
    Or(Box<CalicoExpr>, Box<CalicoExpr>),
}

impl CalicoExpr {
    pub fn parse(s: &str) -> Result<CalicoExpr, FieldError> {
        if s.trim().is_empty() {
            return Ok(CalicoExpr::All);
        }
        let mut p = CalicoParser { s: s.as_bytes(), i: 0 };
        let e = p.or()?;
        p.ws();
        if p.i != p.s.len() {
            return Err(FieldError::whole(format!("selector `{s}`: unexpected `{}` at offset {}", &s[p.i..], p.i)));
        }
        Ok(e)
    }

    pub fn matches(&self, l: &Labels) -> bool {
        use CalicoExpr::*;
        match self {
            All => true,
            Global => false,
            Has(k) => l.contains_key(k),
            Eq(k, v) => l.get(k) == Some(v),
            // Calico: `!=` and `not in` also match when the label is absent.
            Ne(k, v) => l.get(k) != Some(v),
            In(k, vs) => l.get(k).is_some_and(|v| vs.contains(v)),
            NotIn(k, vs) => l.get(k).is_none_or(|v| !vs.contains(v)),
            StartsWith(k, v) => l.get(k).is_some_and(|x| x.starts_with(v.as_str())),
            EndsWith(k, v) => l.get(k).is_some_and(|x| x.ends_with(v.as_str())),
            Contains(k, v) => l.get(k).is_some_and(|x| x.contains(v.as_str())),
            Not(e) => !e.matches(l),
            And(a, b) => a.matches(l) && b.matches(l),
            Or(a, b) => a.matches(l) || b.matches(l),
        }
    }
}

impl std::fmt::Display for CalicoExpr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use CalicoExpr::*;
        let set = |vs: &Vec<String>| vs.iter().map(|v| format!("'{v}'")).collect::<Vec<_>>().join(", ");
        match self {
            All => f.write_str("all()"),
            Global => f.write_str("global()"),
            Has(k) => write!(f, "has({k})"),
            Eq(k, v) => write!(f, "{k} == '{v}'"),
            Ne(k, v) => write!(f, "{k} != '{v}'"),
            In(k, vs) => write!(f, "{k} in {{{}}}", set(vs)),
            NotIn(k, vs) => write!(f, "{k} not in {{{}}}", set(vs)),
            StartsWith(k, v) => write!(f, "{k} starts with '{v}'"),
            EndsWith(k, v) => write!(f, "{k} ends with '{v}'"),
            Contains(k, v) => write!(f, "{k} contains '{v}'"),
            Not(e) => write!(f, "!({e})"),
            And(a, b) => write!(f, "({a} && {b})"),
            Or(a, b) => write!(f, "({a} || {b})"),
        }
    }
}

struct CalicoParser<'a> {
    s: &'a [u8],
    i: usize,
}

impl CalicoParser<'_> {
    fn ws(&mut self) {
        while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
            self.i += 1;
        }
    }

    fn eat(&mut self, tok: &str) -> bool {
        self.ws();
        if self.s[self.i..].starts_with(tok.as_bytes()) {
            self.i += tok.len();
            true
        } else {
            false
        }
    }

    fn err<T>(&self, what: &str) -> Result<T, FieldError> {
        let s = String::from_utf8_lossy(self.s);
        Err(FieldError::whole(format!("selector `{s}`: expected {what} at offset {}", self.i)))
    }

    fn or(&mut self) -> Result<CalicoExpr, FieldError> {
        let mut e = self.and()?;
        while self.eat("||") {
            e = CalicoExpr::Or(Box::new(e), Box::new(self.and()?));
        }
        Ok(e)
    }

    fn and(&mut self) -> Result<CalicoExpr, FieldError> {
        let mut e = self.unary()?;
        while self.eat("&&") {
            e = CalicoExpr::And(Box::new(e), Box::new(self.unary()?));
        }
        Ok(e)
    }

    fn unary(&mut self) -> Result<CalicoExpr, FieldError> {
        if self.eat("!") {
            return Ok(CalicoExpr::Not(Box::new(self.unary()?)));
        }
        if self.eat("(") {
            let e = self.or()?;
            if !self.eat(")") {
                return self.err("`)`");
            }
            return Ok(e);
        }
        if self.eat("all()") {
            return Ok(CalicoExpr::All);
        }
        if self.eat("global()") {
            return Ok(CalicoExpr::Global);
        }
        if self.eat("has(") {
            let k = self.key()?;
            if !self.eat(")") {
                return self.err("`)`");
            }
            return Ok(CalicoExpr::Has(k));
        }
        let k = self.key()?;
        if self.eat("==") {
            return Ok(CalicoExpr::Eq(k, self.string()?));
        }
        if self.eat("!=") {
            return Ok(CalicoExpr::Ne(k, self.string()?));
        }
        if self.eat("not in") {
            return Ok(CalicoExpr::NotIn(k, self.set()?));
        }
        if self.eat("in") {
            return Ok(CalicoExpr::In(k, self.set()?));
        }
        if self.eat("starts with") {
            return Ok(CalicoExpr::StartsWith(k, self.string()?));
        }
        if self.eat("ends with") {
            return Ok(CalicoExpr::EndsWith(k, self.string()?));
        }
        if self.eat("contains") {
            return Ok(CalicoExpr::Contains(k, self.string()?));
        }
        self.err("an operator (==, !=, in, not in, starts with, ends with, contains)")
    }

    fn key(&mut self) -> Result<String, FieldError> {
        self.ws();
        let start = self.i;
        while self.i < self.s.len() && (self.s[self.i].is_ascii_alphanumeric() || b"._/-".contains(&self.s[self.i])) {
            self.i += 1;
        }
        if start == self.i {
            return self.err("a label key");
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn string(&mut self) -> Result<String, FieldError> {
        self.ws();
        let Some(&q) = self.s.get(self.i).filter(|c| **c == b'\'' || **c == b'"') else {
            return self.err("a quoted value");
        };
        let start = self.i + 1;
        let Some(len) = self.s[start..].iter().position(|c| *c == q) else {
            return self.err("a closing quote");
        };
        self.i = start + len + 1;
        Ok(String::from_utf8_lossy(&self.s[start..start + len]).into_owned())
    }

    fn set(&mut self) -> Result<Vec<String>, FieldError> {
        if !self.eat("{") {
            return self.err("`{`");
        }
        let mut out = Vec::new();
        if self.eat("}") {
            return Ok(out);
        }
        loop {
            out.push(self.string()?);
            if self.eat("}") {
                return Ok(out);
            }
            if !self.eat(",") {
                return self.err("`,` or `}`");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn match_expressions_follow_the_api() {
        let sel: K8sLabelSelector = serde_json::from_value(serde_json::json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [
                {"key": "tier", "operator": "In", "values": ["a", "b"]},
                {"key": "env", "operator": "NotIn", "values": ["prod"]},
                {"key": "team", "operator": "Exists"},
                {"key": "legacy", "operator": "DoesNotExist"}
            ]
        }))
        .unwrap();
        let s = LabelSelector::from_k8s(&sel, "spec.podSelector").unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("tier", "a"), ("team", "x")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a"), ("team", "x"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "c"), ("team", "x")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("tier", "a"), ("team", "x"), ("legacy", "1")])));
        assert!(LabelSelector::default().matches(&labels(&[])));
        let bad: K8sLabelSelector =
            serde_json::from_value(serde_json::json!({"matchExpressions": [{"key": "a", "operator": "Equals"}]}))
                .unwrap();
        let e = LabelSelector::from_k8s(&bad, "spec.podSelector").unwrap_err().to_string();
        assert!(e.contains("spec.podSelector.matchExpressions[0].operator") && e.contains("Equals"), "{e}");
    }

    #[test]
    fn calico_expressions() {
        let l = labels(&[("app", "web"), ("tier", "front"), ("k8s-app", "kube-dns")]);
        for (expr, want) in [
            ("all()", true),
            ("", true),
            ("app == 'web'", true),
            ("app == \"db\"", false),
            ("app != 'db'", true),
            ("missing != 'x'", true),
            ("has(tier) && !has(missing)", true),
            ("tier in {'front', 'back'}", true),
            ("tier not in {'front'}", false),
            ("app == 'db' || k8s-app == 'kube-dns'", true),
            ("!(app == 'web')", false),
            ("tier starts with 'fr' && tier ends with 'nt' && app contains 'e'", true),
            ("global()", false),
        ] {
            assert_eq!(CalicoExpr::parse(expr).unwrap().matches(&l), want, "{expr}");
        }
        assert!(CalicoExpr::parse("app = 'x'").unwrap_err().to_string().contains("operator"));
        assert!(CalicoExpr::parse("app == 'x").unwrap_err().to_string().contains("closing quote"));
        assert!(CalicoExpr::parse("(app == 'x'").unwrap_err().to_string().contains("`)`"));
    }
}
