//! The kernel side of the emulation: links plugged and unplugged, routes
//! and neighbours on them, the FORWARD ruleset and its drop counters, all
//! through `ip` and `iptables-restore` in the namespaces (this plays EC2's
//! hypervisor, not product code).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

use crate::process::stdout_of;

use super::model::{Cidr, Desired, Link, OnLink};
use super::{Applied, AppliedLink, Drops, INTERNET_GATEWAY, Inner, MTU, in_netns_async};

impl Inner {
    pub(super) async fn apply_links(
        &self,
        applied: &mut Applied,
        desired: &Desired,
        errors: &mut Vec<anyhow::Error>,
    ) {
        let gone: Vec<u32> = applied
            .links
            .iter()
            .filter(|(i, a)| desired.links.get(i).is_none_or(|d| !a.link.same_nic(d)))
            .map(|(i, _)| *i)
            .collect();
        for i in gone {
            if let Some(a) = applied.links.remove(&i) {
                self.unplug(&a.link).await;
            }
        }
        for (i, link) in &desired.links {
            if !applied.links.contains_key(i) {
                if let Err(e) = self.plug(link).await {
                    errors.push(e.context(format!("plugging {}", link.eni)));
                    let _ = ip(&self.vpc_ns, &["link", "del", &link.vpc_end()]).await;
                    continue;
                }
                applied.links.insert(
                    *i,
                    AppliedLink {
                        link: link.clone(),
                        on_link: OnLink::default(),
                    },
                );
            }
            let Some(a) = applied.links.get_mut(i) else {
                continue;
            };
            a.link = link.clone();
            if a.on_link == link.on_link {
                continue;
            }
            match self.update_on_link(link, &a.on_link).await {
                Ok(()) => a.on_link = link.on_link.clone(),
                Err(e) => {
                    errors.push(e.context(format!("updating routes of {}", link.eni)));
                    match self.observe_on_link(link).await {
                        Ok(seen) => a.on_link = seen,
                        Err(e) => errors.push(e),
                    }
                }
            }
        }
    }

    /// The hypervisor hot-plugs the ENI: a NIC with its MAC appears in
    /// the instance; device 0 gets what DHCP would give it.
    pub(super) async fn plug(&self, link: &Link) -> Result<()> {
        let (vpc_end, node_end) = (link.vpc_end(), link.node_end());
        let router = link.subnet.router();
        ip(
            &self.vpc_ns,
            &[
                "link",
                "add",
                &vpc_end,
                "mtu",
                MTU,
                "type",
                "veth",
                "peer",
                "name",
                &node_end,
                "netns",
                &self.node_ns,
                "address",
                &link.mac,
                "mtu",
                MTU,
            ],
        )
        .await?;
        // Proxy ARP answers at once, as EC2's does (per link: a namespace
        // other than the host's has no neigh/default).
        sysctls(
            &self.vpc_ns,
            &[(&format!("ipv4/neigh/{vpc_end}/proxy_delay"), "0")],
        )
        .await?;
        batch(
            &self.vpc_ns,
            &[
                format!("addr add {router}/32 dev {vpc_end}"),
                format!("link set {vpc_end} up"),
            ],
            false,
        )
        .await?;
        if link.device_index == 0 {
            batch(
                &self.node_ns,
                &[
                    format!(
                        "addr add {}/{} dev {node_end}",
                        link.primary, link.subnet.len
                    ),
                    format!("link set {node_end} up"),
                    format!("route replace default via {router} dev {node_end} proto dhcp"),
                ],
                false,
            )
            .await?;
        }
        self.log(&format!(
            "plugged {} as {node_end} ({}, {} in {})",
            link.eni, link.mac, link.primary, link.subnet
        ));
        Ok(())
    }

    /// Deleting the VPC end deletes the node end: the NIC is gone.
    pub(super) async fn unplug(&self, link: &Link) {
        match ip(&self.vpc_ns, &["link", "del", &link.vpc_end()]).await {
            Ok(_) => self.log(&format!("unplugged {} ({})", link.eni, link.node_end())),
            Err(e) => self.log(&format!("unplugging {}: {e:#}", link.eni)),
        }
    }

    pub(super) async fn update_on_link(&self, link: &Link, old: &OnLink) -> Result<()> {
        let (dev, mac) = (link.vpc_end(), &link.mac);
        let new = &link.on_link;
        let mut lines = Vec::new();
        for r in new.routes.difference(&old.routes) {
            lines.push(format!("route replace {r} dev {dev}"));
        }
        for a in new.neighbours.difference(&old.neighbours) {
            lines.push(format!(
                "neigh replace {a} lladdr {mac} dev {dev} nud permanent"
            ));
        }
        for a in new.proxies.difference(&old.proxies) {
            lines.push(format!("neigh replace proxy {a} dev {dev}"));
        }
        for r in old.routes.difference(&new.routes) {
            lines.push(format!("route del {r} dev {dev}"));
        }
        for a in old.neighbours.difference(&new.neighbours) {
            lines.push(format!("neigh del {a} dev {dev}"));
        }
        for a in old.proxies.difference(&new.proxies) {
            lines.push(format!("neigh del proxy {a} dev {dev}"));
        }
        let mut changes: Vec<String> = new
            .routes
            .difference(&old.routes)
            .map(|r| format!("+{r}"))
            .chain(old.routes.difference(&new.routes).map(|r| format!("-{r}")))
            .collect();
        changes.extend(
            new.proxies
                .difference(&old.proxies)
                .map(|a| format!("+arp-proxy {a}"))
                .chain(
                    old.proxies
                        .difference(&new.proxies)
                        .map(|a| format!("-arp-proxy {a}")),
                ),
        );
        if !changes.is_empty() {
            self.log(&format!(
                "{} ({}): {}",
                link.node_end(),
                link.eni,
                abbreviate(&changes)
            ));
        }
        batch(&self.vpc_ns, &lines, true).await
    }

    /// What the VPC end of `link` holds, read from the kernel.
    pub(super) async fn observe_on_link(&self, link: &Link) -> Result<OnLink> {
        let dev = link.vpc_end();
        let routes = ip_json(&self.vpc_ns, &["route", "show", "dev", &dev]).await?;
        let neighbours = ip_json(
            &self.vpc_ns,
            &["neigh", "show", "dev", &dev, "nud", "permanent"],
        )
        .await?;
        let proxies = ip_json(&self.vpc_ns, &["neigh", "show", "proxy", "dev", &dev]).await?;
        let dsts = |v: &[Value]| -> Vec<String> {
            v.iter()
                .filter_map(|e| e["dst"].as_str().map(str::to_owned))
                .collect()
        };
        Ok(OnLink {
            routes: dsts(&routes)
                .iter()
                .filter_map(|d| Cidr::parse(d))
                .collect(),
            neighbours: dsts(&neighbours)
                .iter()
                .filter_map(|d| d.parse().ok())
                .collect(),
            proxies: dsts(&proxies)
                .iter()
                .filter_map(|d| d.parse().ok())
                .collect(),
        })
    }

    /// Per-chain counters of the DROP rules, and the current ruleset as
    /// saved.
    pub(super) fn current_drops(&self) -> Result<(Drops, BTreeMap<String, String>)> {
        let saved = run_blocking(
            "ip",
            &[
                "netns",
                "exec",
                &self.vpc_ns,
                "iptables-save",
                "-c",
                "-t",
                "filter",
            ],
            None,
        )?;
        let mut drops = Drops::default();
        let mut counters = BTreeMap::new();
        for line in saved.lines() {
            let Some((counter, rule)) = line.strip_prefix('[').and_then(|l| l.split_once("] "))
            else {
                continue;
            };
            let Some(chain) = rule
                .strip_prefix("-A ")
                .and_then(|r| r.strip_suffix(" -j DROP"))
            else {
                continue;
            };
            let packets: u64 = counter
                .split(':')
                .next()
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            if let Some(eni) = chain.strip_prefix("SD-") {
                drops.src_dst_check.insert(eni.to_string(), packets);
            } else if let Some(eni) = chain.strip_prefix("SG-") {
                drops.security_group.insert(eni.to_string(), packets);
            } else {
                continue;
            }
            counters.insert(chain.to_string(), counter.to_string());
        }
        Ok((drops, counters))
    }

    /// Rewrites the filter table at once, carrying over the DROP counters
    /// (and keeping those of removed ENIs aside).
    pub(super) fn apply_ruleset(&self, old: Option<&str>, new: &str) -> Result<()> {
        let (drops, counters) = self.current_drops()?;
        let mut with_counters = String::new();
        for line in new.lines() {
            let counter = line
                .strip_prefix("-A ")
                .and_then(|r| r.strip_suffix(" -j DROP"))
                .and_then(|chain| counters.get(chain));
            match counter {
                Some(c) => with_counters += &format!("[{c}] {line}\n"),
                None => with_counters += &format!("{line}\n"),
            }
        }
        run_blocking(
            "ip",
            &[
                "netns",
                "exec",
                &self.vpc_ns,
                "iptables-restore",
                "--counters",
            ],
            Some(&with_counters),
        )?;
        let kept: BTreeSet<&str> = new.lines().collect();
        let mut retired = self.retired.lock().map_err(|_| anyhow!("poisoned"))?;
        for (eni, n) in &drops.src_dst_check {
            if !kept.contains(format!("-A SD-{eni} -j DROP").as_str()) {
                *retired.src_dst_check.entry(eni.clone()).or_default() += n;
            }
        }
        for (eni, n) in &drops.security_group {
            if !kept.contains(format!("-A SG-{eni} -j DROP").as_str()) {
                *retired.security_group.entry(eni.clone()).or_default() += n;
            }
        }
        let before: BTreeSet<&str> = old.unwrap_or_default().lines().collect();
        let changes: Vec<String> = kept
            .difference(&before)
            .filter(|l| l.starts_with("-A"))
            .map(|l| format!("+[{l}]"))
            .chain(
                before
                    .difference(&kept)
                    .filter(|l| l.starts_with("-A"))
                    .map(|l| format!("-[{l}]")),
            )
            .collect();
        self.log(&format!("FORWARD rules: {}", abbreviate(&changes)));
        Ok(())
    }

    pub(super) async fn apply_inet_routes(
        &self,
        applied: &mut Applied,
        desired: &Desired,
    ) -> Result<()> {
        let mut lines = Vec::new();
        for c in desired.vpc_cidrs.difference(&applied.inet_routes) {
            lines.push(format!("route replace {c} via {INTERNET_GATEWAY} dev eth0"));
        }
        for c in applied.inet_routes.difference(&desired.vpc_cidrs) {
            lines.push(format!("route del {c} via {INTERNET_GATEWAY} dev eth0"));
        }
        match batch(&self.inet_ns, &lines, true).await {
            Ok(()) => {
                self.log(&format!(
                    "internet routes the VPC's {}",
                    desired
                        .vpc_cidrs
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                applied.inet_routes = desired.vpc_cidrs.clone();
                Ok(())
            }
            Err(e) => {
                let routes = ip_json(&self.inet_ns, &["route", "show"]).await?;
                let gateway = INTERNET_GATEWAY.to_string();
                applied.inet_routes = routes
                    .iter()
                    .filter(|r| r["gateway"].as_str() == Some(gateway.as_str()))
                    .filter_map(|r| Cidr::parse(r["dst"].as_str()?))
                    .collect();
                Err(e)
            }
        }
    }
}

/// The first few of a long list of changes, for the log.
pub(super) fn abbreviate(changes: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s = changes
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    if changes.len() > SHOWN {
        s += &format!(" (and {} more)", changes.len() - SHOWN);
    }
    s
}

/// Writes `/proc/sys/net/<key>` as seen from inside `ns`.
pub(super) async fn sysctls(ns: &str, values: &[(&str, &str)]) -> Result<()> {
    let values: Vec<(String, String)> = values
        .iter()
        .map(|(k, v)| (format!("/proc/sys/net/{k}"), v.to_string()))
        .collect();
    let ns_name = ns.to_owned();
    in_netns_async(ns, move || -> Result<()> {
        for (path, value) in &values {
            std::fs::write(path, value)
                .with_context(|| format!("setting {path} = {value} in {ns_name}"))?;
        }
        Ok(())
    })
    .await?
}

pub(super) async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("running {program}"))?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.unwrap_or_default().as_bytes())
            .await?;
    }
    let out = child.wait_with_output().await?;
    stdout_of(program, args, &out)
}

/// For the synchronous paths ([`EmulatedVpc::drops`], the ruleset swap,
/// which must not interleave with reading counters).
pub(super) fn run_blocking(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("running {program}"))?;
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin.unwrap_or_default().as_bytes())?;
    }
    let out = child.wait_with_output()?;
    stdout_of(program, args, &out)
}

pub(super) async fn ip(ns: &str, args: &[&str]) -> Result<String> {
    let mut full = vec!["-n", ns];
    full.extend_from_slice(args);
    run("ip", &full, None).await
}

pub(super) async fn ip_json(ns: &str, args: &[&str]) -> Result<Vec<Value>> {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let out = ip(ns, &full).await?;
    if out.trim().is_empty() {
        return Ok(Vec::new());
    }
    Ok(serde_json::from_str(&out)?)
}

/// `ip -batch` in `ns`; with `force`, every line is tried and the first
/// failures are reported.
pub(super) async fn batch(ns: &str, lines: &[String], force: bool) -> Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut args = vec!["-n", ns];
    if force {
        args.push("-force");
    }
    args.extend(["-batch", "-"]);
    run("ip", &args, Some(&(lines.join("\n") + "\n")))
        .await
        .map(drop)
}
