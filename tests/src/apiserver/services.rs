//! Services' cluster IPs, allocated as kube-apiserver allocates them from
//! its `--service-cluster-ip-range`: a Service created without
//! `spec.clusterIP` gets the first free address; one asking for an address
//! gets it if it is free and in the range; `None` is headless. IPv4 only:
//! the lab's Services are single-stack.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use serde_json::{json, Value};

use super::status::FieldError;

/// The lab's service range (kube-apiserver's default is 10.96.0.0/12).
pub const SERVICE_RANGE: Ipv4Net = match Ipv4Net::new(Ipv4Addr::new(10, 96, 0, 0), 16) {
    Ok(net) => net,
    Err(_) => panic!("a valid range"),
};

/// Gives `service` its cluster IP (`spec.clusterIP`, `spec.clusterIPs`),
/// given the Services already stored.
pub fn allocate<'a>(
    service: &mut Value,
    stored: impl Iterator<Item = &'a Value>,
) -> Result<(), FieldError> {
    let taken: BTreeSet<Ipv4Addr> = stored
        .filter_map(|s| s["spec"]["clusterIP"].as_str()?.parse().ok())
        .collect();
    let asked = service["spec"]["clusterIP"].as_str().unwrap_or_default();
    let ip = match asked {
        "None" => None,
        "" => Some(
            SERVICE_RANGE
                .hosts()
                .find(|ip| !taken.contains(ip))
                .ok_or_else(|| {
                    FieldError::invalid("spec.clusterIP", "the service range is full")
                })?,
        ),
        asked => {
            let ip: Ipv4Addr = asked.parse().map_err(|_| {
                FieldError::invalid(
                    "spec.clusterIP",
                    format!("{asked:?} is not a valid IP address"),
                )
            })?;
            if !SERVICE_RANGE.contains(&ip) {
                return Err(FieldError::invalid(
                    "spec.clusterIP",
                    format!("{ip} is not in the service range {SERVICE_RANGE}"),
                ));
            }
            if taken.contains(&ip) {
                return Err(FieldError::invalid(
                    "spec.clusterIP",
                    format!("{ip}: provided IP is already allocated"),
                ));
            }
            Some(ip)
        }
    };
    let spec = &mut service["spec"];
    let shown = ip.map_or("None".to_string(), |ip| ip.to_string());
    spec["clusterIP"] = json!(shown);
    spec["clusterIPs"] = json!([shown]);
    if spec["type"].is_null() {
        spec["type"] = json!("ClusterIP");
    }
    spec["ipFamilies"] = json!(["IPv4"]);
    spec["ipFamilyPolicy"] = json!("SingleStack");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_free_addresses_and_refuses_taken_or_foreign_ones() {
        let stored = [
            json!({"spec": {"clusterIP": "10.96.0.1"}}),
            json!({"spec": {"clusterIP": "None"}}),
        ];
        let mut fresh = json!({"spec": {"ports": [{"port": 80}]}});
        allocate(&mut fresh, stored.iter()).unwrap();
        assert_eq!(fresh["spec"]["clusterIP"], "10.96.0.2");
        assert_eq!(fresh["spec"]["clusterIPs"], json!(["10.96.0.2"]));
        assert_eq!(fresh["spec"]["type"], "ClusterIP");
        let mut headless = json!({"spec": {"clusterIP": "None"}});
        allocate(&mut headless, stored.iter()).unwrap();
        assert_eq!(headless["spec"]["clusterIPs"], json!(["None"]));
        for (asked, says) in [
            ("10.96.0.1", "already allocated"),
            ("192.0.2.1", "not in the service range"),
            ("x", "not a valid IP"),
        ] {
            let mut s = json!({"spec": {"clusterIP": asked}});
            let e = allocate(&mut s, stored.iter()).unwrap_err();
            assert_eq!(e.field, "spec.clusterIP");
            assert!(e.message.contains(says), "{asked}: {}", e.message);
        }
    }
}
