//! ValidatingAdmissionPolicy, evaluated as kube-apiserver's admission plugin
//! does: every binding whose policy's rules match the request runs the
//! policy's match conditions, variables and validations in CEL over
//! `object`, `oldObject` and `request`; the first failed validation of a
//! binding with the `Deny` action rejects the request with the policy's
//! reason and message. Evaluation errors follow the policy's failurePolicy.
//!
//! What the lab does not evaluate (parameters, namespace and object
//! selectors, `authorizer`) fails the request when a matching policy uses
//! it, rather than passing silently: the lab must never prove a policy it
//! does not run.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use cel::{Context, Env};
use serde_json::{json, Value};

use super::auth::User;
use super::kinds::Kind;
use super::status::ApiError;

/// The write being admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
        }
    }
}

/// An admission request: who writes what, and the object before and after.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    pub operation: Operation,
    pub kind: &'static Kind,
    /// Empty for the main resource.
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
    pub user: &'a User,
    pub dry_run: bool,
    /// Absent on create.
    pub old: Option<&'a Value>,
    /// Absent on delete.
    pub new: Option<&'a Value>,
}

/// The CEL environment of Kubernetes admission: the standard library with
/// the strings, lists and math extensions.
static ENV: LazyLock<Arc<Env>> = LazyLock::new(|| {
    let mut env = Env::stdlib();
    for ext in [
        cel::extensions::strings as fn(&mut Env) -> Result<(), cel::DeclarationError>,
        cel::extensions::lists,
        cel::extensions::math,
    ] {
        env.add_extension(ext)
            .expect("the CEL extensions declare distinct overloads");
    }
    Arc::new(env)
});

/// Admits the request or returns the Status error of the first binding
/// that denies it. Bindings are judged in name order, so the answer never
/// depends on storage order.
pub fn validate(
    policies: &[Arc<Value>],
    bindings: &[Arc<Value>],
    req: &Request,
) -> Result<(), ApiError> {
    let mut bindings: Vec<&Value> = bindings.iter().map(AsRef::as_ref).collect();
    bindings.sort_by(|a, b| name_of(a).cmp(name_of(b)));
    for binding in bindings {
        let policy_name = binding["spec"]["policyName"].as_str().unwrap_or_default();
        let Some(policy) = policies.iter().find(|p| name_of(p) == policy_name) else {
            continue; // A binding to no policy does nothing, as in Kubernetes.
        };
        let denies = binding["spec"]["validationActions"]
            .as_array()
            .is_some_and(|a| a.iter().any(|v| v == "Deny"));
        if !denies {
            continue; // Warn and Audit do not reject.
        }
        let failure_policy_ignores = policy["spec"]["failurePolicy"] == "Ignore";
        match judge(policy, binding, req) {
            Ok(Verdict::Allow) => {}
            Ok(Verdict::Deny { reason, message }) => {
                return Err(denial(policy, binding, req, reason, &message))
            }
            Err(_) if failure_policy_ignores => {}
            Err(error) => return Err(denial(policy, binding, req, "Invalid", &error)),
        }
    }
    Ok(())
}

fn name_of(o: &Value) -> &str {
    o["metadata"]["name"].as_str().unwrap_or_default()
}

enum Verdict {
    Allow,
    Deny {
        reason: &'static str,
        message: String,
    },
}

/// One policy through one binding: `Err` is an evaluation error (left to
/// the failure policy).
fn judge(policy: &Value, binding: &Value, req: &Request) -> Result<Verdict, String> {
    let spec = &policy["spec"];
    if !matches_constraints(&spec["matchConstraints"], req)? {
        return Ok(Verdict::Allow);
    }
    if !binding["spec"]["matchResources"].is_null()
        && !matches_constraints(&binding["spec"]["matchResources"], req)?
    {
        return Ok(Verdict::Allow);
    }
    for unsupported in ["paramKind"] {
        if !spec[unsupported].is_null() {
            return Err(format!(
                "the lab API server does not evaluate spec.{unsupported}"
            ));
        }
    }
    if !binding["spec"]["paramRef"].is_null() {
        return Err("the lab API server does not evaluate spec.paramRef".into());
    }
    let mut scope = Scope::new(req)?;
    for condition in list(&spec["matchConditions"]) {
        if !scope.boolean(str_field(condition, "expression"))? {
            return Ok(Verdict::Allow);
        }
    }
    for variable in list(&spec["variables"]) {
        let value = scope.eval(str_field(variable, "expression"))?;
        scope
            .variables
            .insert(str_field(variable, "name").to_string(), value);
    }
    for validation in list(&spec["validations"]) {
        let expression = str_field(validation, "expression");
        if scope.boolean(expression)? {
            continue;
        }
        let message = validation["messageExpression"]
            .as_str()
            .and_then(|e| match scope.eval(e) {
                Ok(cel::Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_string()),
                _ => None, // As in Kubernetes: fall back to `message`.
            })
            .or_else(|| validation["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("failed expression: {}", expression.trim()));
        return Ok(Verdict::Deny {
            reason: reason(validation["reason"].as_str()),
            message,
        });
    }
    Ok(Verdict::Allow)
}

/// The four reasons a validation may give (the API refuses others).
fn reason(given: Option<&str>) -> &'static str {
    match given {
        Some("Unauthorized") => "Unauthorized",
        Some("Forbidden") => "Forbidden",
        Some("RequestEntityTooLarge") => "RequestEntityTooLarge",
        _ => "Invalid",
    }
}

fn code(reason: &str) -> u16 {
    match reason {
        "Unauthorized" => 401,
        "Forbidden" => 403,
        "RequestEntityTooLarge" => 413,
        _ => 422,
    }
}

/// kube-apiserver's rejection: a Forbidden error on the object whose
/// code and reason are the validation's, with the message as a cause.
fn denial(
    policy: &Value,
    binding: &Value,
    req: &Request,
    reason: &'static str,
    message: &str,
) -> ApiError {
    let message = format!(
        "ValidatingAdmissionPolicy '{}' with binding '{}' denied request: {message}",
        name_of(policy),
        name_of(binding)
    );
    let mut e = ApiError::forbidden_on(req.kind, req.name, &message);
    e.reason = reason;
    e.code = code(reason);
    if let Some(d) = e.details.as_mut() {
        d["causes"] = json!([{ "message": message }]);
    }
    e
}

fn list(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

fn str_field<'a>(v: &'a Value, field: &str) -> &'a str {
    v[field].as_str().unwrap_or_default()
}

/// Whether `matchConstraints` (or a binding's `matchResources`) selects the
/// request: a resource rule matches and no exclude rule does.
fn matches_constraints(constraints: &Value, req: &Request) -> Result<bool, String> {
    for selector in ["namespaceSelector", "objectSelector"] {
        let s = &constraints[selector];
        let empty = s.is_null()
            || s.as_object().is_some_and(|m| {
                m.values().all(|v| {
                    v.as_object().is_some_and(|o| o.is_empty())
                        || v.as_array().is_some_and(|a| a.is_empty())
                })
            });
        if !empty {
            return Err(format!("the lab API server does not evaluate {selector}"));
        }
    }
    let included = list(&constraints["resourceRules"]).any(|r| rule_matches(r, req));
    let excluded = list(&constraints["excludeResourceRules"]).any(|r| rule_matches(r, req));
    Ok(included && !excluded)
}

/// One `NamedRuleWithOperations`: groups, versions, operations, resources
/// (`*` all resources, `*/*` all with subresources, `nodes/*`, `*/status`),
/// resource names and scope.
fn rule_matches(rule: &Value, req: &Request) -> bool {
    let items =
        |field: &str| -> Vec<&str> { list(&rule[field]).filter_map(Value::as_str).collect() };
    let any = |field: &str, want: &str| items(field).iter().any(|i| *i == "*" || *i == want);
    let (kind, sub) = (req.kind, req.subresource);
    let resource_ok = items("resources").iter().any(|r| {
        let (res, rsub) = r.split_once('/').unwrap_or((r, ""));
        (res == "*" || res == kind.plural)
            && (rsub == sub || (rsub == "*" && !sub.is_empty()) || (res == "*" && rsub == "*"))
    });
    let names = items("resourceNames");
    let scope_ok = match rule["scope"].as_str().unwrap_or("*") {
        "Cluster" => !kind.namespaced,
        "Namespaced" => kind.namespaced,
        _ => true,
    };
    any("apiGroups", kind.group)
        && any("apiVersions", kind.version)
        && any("operations", req.operation.as_str())
        && resource_ok
        && (names.is_empty() || names.contains(&req.name))
        && scope_ok
}

/// The CEL variables of one evaluation.
struct Scope {
    object: cel::Value,
    old_object: cel::Value,
    request: cel::Value,
    variables: HashMap<String, cel::Value>,
}

impl Scope {
    fn new(req: &Request) -> Result<Self, String> {
        let to = |v: Option<&Value>| {
            cel::to_value(v.cloned().unwrap_or(Value::Null)).map_err(|e| e.to_string())
        };
        let kind = req.kind;
        let request = json!({
            "kind": {"group": kind.group, "version": kind.version, "kind": kind.kind},
            "resource": {"group": kind.group, "version": kind.version, "resource": kind.plural},
            "subResource": req.subresource,
            "requestKind": {"group": kind.group, "version": kind.version, "kind": kind.kind},
            "requestResource": {"group": kind.group, "version": kind.version, "resource": kind.plural},
            "name": req.name,
            "namespace": req.namespace,
            "operation": req.operation.as_str(),
            "userInfo": req.user.to_user_info(),
            "dryRun": req.dry_run,
        });
        Ok(Self {
            object: to(req.new)?,
            old_object: to(req.old)?,
            request: to(Some(&request))?,
            variables: HashMap::new(),
        })
    }

    fn eval(&self, expression: &str) -> Result<cel::Value, String> {
        let program = ENV
            .compile(expression)
            .map_err(|e| format!("compilation error: {e}"))?;
        let mut ctx = Context::with_env(ENV.clone());
        ctx.add_variable_from_value("object", self.object.clone());
        ctx.add_variable_from_value("oldObject", self.old_object.clone());
        ctx.add_variable_from_value("request", self.request.clone());
        ctx.add_variable_from_value("params", cel::Value::Null);
        ctx.add_variable_from_value("variables", cel::Value::from(self.variables.clone()));
        program
            .execute(&ctx)
            .map_err(|e| format!("expression '{}' resulted in error: {e}", expression.trim()))
    }

    fn boolean(&self, expression: &str) -> Result<bool, String> {
        match self.eval(expression)? {
            cel::Value::Bool(b) => Ok(b),
            other => Err(format!(
                "expression '{}' must evaluate to bool, not {other:?}",
                expression.trim()
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::apiserver::auth::{service_account_user, EXTRA_NODE_NAME};
    use crate::apiserver::kinds::lookup;

    /// The policy and binding deploy/ ships.
    fn shipped() -> (Vec<Arc<Value>>, Vec<Arc<Value>>) {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let m = crate::lab::manifest::load(&deploy).unwrap();
        let of = |kind: &str| -> Vec<Arc<Value>> {
            m.objects
                .iter()
                .filter(|o| o["kind"] == kind)
                .cloned()
                .map(Arc::new)
                .collect()
        };
        let (p, b) = (
            of("ValidatingAdmissionPolicy"),
            of("ValidatingAdmissionPolicyBinding"),
        );
        // Each node's own Node, its own block claim, Weft's annotations
        // from no one else, and pod ranges from no kubelet.
        assert_eq!((p.len(), b.len()), (4, 4));
        (p, b)
    }

    fn meshd_on(node: Option<&str>) -> User {
        let mut extra = BTreeMap::new();
        if let Some(n) = node {
            extra.insert(EXTRA_NODE_NAME.to_string(), vec![n.to_string()]);
        }
        User {
            name: service_account_user("weft-system", "meshd"),
            uid: "sa".into(),
            groups: vec![
                "system:serviceaccounts".into(),
                "system:authenticated".into(),
            ],
            extra,
        }
    }

    fn node(name: &str, annotations: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": name, "uid": format!("{name}-uid"), "labels": {"zone": "a"},
                            "annotations": annotations},
               "spec": {"podCIDR": "10.0.0.0/24"}})
    }

    struct Case {
        what: &'static str,
        user: User,
        operation: Operation,
        sub: &'static str,
        name: &'static str,
        old: Option<Value>,
        new: Option<Value>,
        /// `None`: admitted; else a part of the denial's message.
        denied: Option<&'static str>,
    }

    fn judge_case(
        c: &Case,
        policies: &[Arc<Value>],
        bindings: &[Arc<Value>],
    ) -> Result<(), ApiError> {
        validate(
            policies,
            bindings,
            &Request {
                operation: c.operation,
                kind: lookup("", "v1", "nodes").unwrap(),
                subresource: c.sub,
                namespace: "",
                name: c.name,
                user: &c.user,
                dry_run: false,
                old: c.old.as_ref(),
                new: c.new.as_ref(),
            },
        )
    }

    #[test]
    fn the_shipped_policy_confines_each_agent_to_its_own_nodes_weft_annotations() {
        let (policies, bindings) = shipped();
        let base = json!({"weft.dev/public-key": "k1", "admin.example/owner": "ops"});
        let with = |f: &dyn Fn(&mut Value)| {
            let mut n = node("node-1", base.clone());
            f(&mut n);
            n
        };
        let update = |what, user: User, name, new: Value, denied| Case {
            what,
            user,
            operation: Operation::Update,
            sub: "",
            name,
            old: Some(if name == "node-1" {
                node("node-1", base.clone())
            } else {
                node(name, base.clone())
            }),
            new: Some(new),
            denied,
        };
        let own = |f: &dyn Fn(&mut Value)| with(f);
        let cases = vec![
            update(
                "own key rotated",
                meshd_on(Some("node-1")),
                "node-1",
                own(&|n| n["metadata"]["annotations"]["weft.dev/public-key"] = json!("k2")),
                None,
            ),
            update(
                "own endpoint added",
                meshd_on(Some("node-1")),
                "node-1",
                own(&|n| {
                    n["metadata"]["annotations"]["weft.dev/endpoint"] = json!("198.18.1.1:51820")
                }),
                None,
            ),
            update(
                "a no-op",
                meshd_on(Some("node-1")),
                "node-1",
                own(&|_| {}),
                None,
            ),
            update(
                "another node's key",
                meshd_on(Some("node-1")),
                "node-2",
                {
                    let mut n = node("node-2", base.clone());
                    n["metadata"]["annotations"]["weft.dev/public-key"] = json!("attacker");
                    n
                },
                Some("the Weft agent on node node-1 may not change Node node-2"),
            ),
            update(
                "a label",
                meshd_on(Some("node-1")),
                "node-1",
                own(&|n| n["metadata"]["labels"]["zone"] = json!("b")),
                Some("spec, labels, finalizers and owners"),
            ),
            update(
                "the spec",
                meshd_on(Some("node-1")),
                "node-1",
                own(&|n| n["spec"]["unschedulable"] = json!(true)),
                Some("spec, labels, finalizers and owners"),
            ),
            update(
                "a finalizer",
                meshd_on(Some("node-1")),
                "node-1",
                own(&|n| n["metadata"]["finalizers"] = json!(["x"])),
                Some("spec, labels, finalizers and owners"),
            ),
            update(
                "a foreign annotation",
                meshd_on(Some("node-1")),
                "node-1",
                own(&|n| n["metadata"]["annotations"]["admin.example/owner"] = json!("me")),
                Some("only the annotations it owns: weft.dev/version, weft.dev/public-key"),
            ),
            update(
                "a foreign annotation removed",
                meshd_on(Some("node-1")),
                "node-1",
                own(&|n| {
                    n["metadata"]["annotations"]
                        .as_object_mut()
                        .unwrap()
                        .remove("admin.example/owner");
                }),
                Some("only the annotations it owns"),
            ),
            update(
                "a weft.dev/ key meshd does not own",
                meshd_on(Some("node-1")),
                "node-1",
                own(&|n| n["metadata"]["annotations"]["weft.dev/relay"] = json!("yes")),
                Some("only the annotations it owns"),
            ),
            update(
                "a token bound to no node",
                meshd_on(None),
                "node-1",
                own(&|n| n["metadata"]["annotations"]["weft.dev/public-key"] = json!("k2")),
                Some("not bound to a node"),
            ),
            update(
                "the admin changes anything",
                User::admin(),
                "node-2",
                own(&|n| n["metadata"]["labels"]["zone"] = json!("b")),
                None,
            ),
            Case {
                what: "a create",
                user: meshd_on(Some("node-9")),
                operation: Operation::Create,
                sub: "",
                name: "node-9",
                old: None,
                new: Some(node("node-9", json!({}))),
                denied: Some("may only update Nodes (not CREATE)"),
            },
            Case {
                what: "a delete of itself",
                user: meshd_on(Some("node-1")),
                operation: Operation::Delete,
                sub: "",
                name: "node-1",
                old: Some(node("node-1", base.clone())),
                new: None,
                denied: Some("may only update Nodes (not DELETE)"),
            },
            Case {
                what: "its status",
                user: meshd_on(Some("node-1")),
                operation: Operation::Update,
                sub: "status",
                name: "node-1",
                old: Some(node("node-1", base.clone())),
                new: Some(node("node-1", base.clone())),
                denied: Some("(not UPDATE status)"),
            },
        ];
        for c in &cases {
            match (judge_case(c, &policies, &bindings), c.denied) {
                (Ok(()), None) => {}
                (Err(e), Some(part)) => {
                    assert_eq!((e.code, e.reason), (403, "Forbidden"), "{}: {e:?}", c.what);
                    assert!(
                        e.message.starts_with(&format!(
                            "nodes \"{}\" is forbidden: ValidatingAdmissionPolicy 'weft-meshd-own-node' with binding 'weft-meshd-own-node' denied request: ",
                            c.name
                        )),
                        "{}: {}", c.what, e.message
                    );
                    assert!(e.message.contains(part), "{}: {}", c.what, e.message);
                }
                (got, want) => panic!("{}: got {got:?}, wanted denial {want:?}", c.what),
            }
        }
    }

    #[test]
    fn the_policy_lists_exactly_the_annotations_meshd_owns() {
        let (policies, _) = shipped();
        let own_node = policies
            .iter()
            .find(|p| p["metadata"]["name"] == "weft-meshd-own-node")
            .expect("the own-Node policy");
        let owned = own_node["spec"]["variables"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "owned")
            .unwrap()["expression"]
            .as_str()
            .unwrap()
            .to_string();
        let scope = Scope::new(&Request {
            operation: Operation::Update,
            kind: lookup("", "v1", "nodes").unwrap(),
            subresource: "",
            namespace: "",
            name: "n",
            user: &User::admin(),
            dry_run: false,
            old: None,
            new: None,
        })
        .unwrap();
        let listed = scope.eval(&owned).unwrap();
        let want: Vec<cel::Value> = weft_meshd::annotations::OWNED
            .iter()
            .map(|k| cel::Value::from(k.to_string()))
            .collect();
        assert_eq!(listed, cel::Value::List(Arc::new(want)));
    }

    #[test]
    fn errors_follow_the_failure_policy_and_unsupported_fields_fail_closed() {
        let policy = |failure: &str, extra: Value| {
            let mut p = json!({"metadata": {"name": "p"}, "spec": {
                "failurePolicy": failure,
                "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                    "operations": ["*"], "resources": ["nodes"]}]},
                "validations": [{"expression": "object.metadata.nosuch.field == 1"}]}});
            for (k, v) in extra.as_object().unwrap() {
                p["spec"][k] = v.clone();
            }
            vec![Arc::new(p)]
        };
        let binding = vec![Arc::new(json!({"metadata": {"name": "b"},
            "spec": {"policyName": "p", "validationActions": ["Deny"]}}))];
        let c = Case {
            what: "",
            user: User::admin(),
            operation: Operation::Update,
            sub: "",
            name: "n",
            old: Some(node("n", json!({}))),
            new: Some(node("n", json!({}))),
            denied: None,
        };
        let e = judge_case(&c, &policy("Fail", json!({})), &binding).unwrap_err();
        assert_eq!((e.code, e.reason), (422, "Invalid"));
        assert!(e.message.contains("resulted in error"), "{}", e.message);
        judge_case(&c, &policy("Ignore", json!({})), &binding).unwrap();
        let e = judge_case(
            &c,
            &policy("Fail", json!({"paramKind": {"kind": "ConfigMap"}})),
            &binding,
        )
        .unwrap_err();
        assert!(
            e.message.contains("does not evaluate spec.paramKind"),
            "{}",
            e.message
        );
        // Audit-only bindings and bindings to no policy reject nothing.
        let audit = vec![Arc::new(json!({"metadata": {"name": "b"},
            "spec": {"policyName": "p", "validationActions": ["Audit"]}}))];
        judge_case(&c, &policy("Fail", json!({})), &audit).unwrap();
        judge_case(&c, &[], &binding).unwrap();
        // A policy for other resources is not evaluated at all.
        let mut pods = policy("Fail", json!({}));
        Arc::make_mut(&mut pods[0])["spec"]["matchConstraints"]["resourceRules"][0]["resources"] =
            json!(["pods"]);
        judge_case(&c, &pods, &binding).unwrap();
    }
}
