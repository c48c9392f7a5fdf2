//! Links as GCE writes them, and references as callers write them (full
//! URLs, `projects/...` paths, scope-relative paths or bare names).

use super::{API, Kind, Result, Scope, World};
use crate::error::ApiError;

impl World {
    pub fn project(&self) -> &str {
        &self.cfg.project
    }

    pub(super) fn project_path(&self) -> String {
        format!("projects/{}", self.cfg.project)
    }

    pub(super) fn rel(&self, kind: Kind, scope: &Scope, name: &str) -> String {
        format!(
            "projects/{}/{}/{}/{name}",
            self.cfg.project,
            scope.path(),
            kind.collection()
        )
    }

    pub(super) fn link(&self, kind: Kind, scope: &Scope, name: &str) -> String {
        format!("{API}{}", self.rel(kind, scope, name))
    }

    pub fn region_link(&self) -> String {
        format!("{API}{}/regions/{}", self.project_path(), self.cfg.region)
    }

    pub fn zone_link(&self, zone: &str) -> String {
        format!("{API}{}/zones/{zone}", self.project_path())
    }

    pub fn network_link(&self) -> String {
        format!(
            "{API}{}/global/networks/{}",
            self.project_path(),
            self.cfg.network
        )
    }

    pub fn subnetwork_link(&self) -> String {
        format!(
            "{API}{}/regions/{}/subnetworks/{}",
            self.project_path(),
            self.cfg.region,
            self.cfg.subnetwork.name
        )
    }

    pub(super) fn instance_rel(&self, zone: &str, name: &str) -> String {
        format!("{}/zones/{zone}/instances/{name}", self.project_path())
    }

    pub(super) fn instance_link(&self, zone: &str, name: &str) -> String {
        format!("{API}{}", self.instance_rel(zone, name))
    }

    /// `(collection, scope, name)` of a reference: a full URL (any host),
    /// `projects/p/...`, or a scope-relative path (`zones/z/...`,
    /// `regions/r/...`, `global/...`). A bare name is taken in
    /// `default_scope`.
    pub(super) fn parse_ref(
        &self,
        s: &str,
        default_scope: &Scope,
    ) -> Option<(String, Scope, String)> {
        if !s.contains('/') {
            return Some((String::new(), default_scope.clone(), s.to_string()));
        }
        let rest = match s.find("/projects/") {
            Some(i) => &s[i + 1..],
            None => s,
        };
        let rest = match rest.strip_prefix("projects/") {
            Some(r) => {
                let (project, r) = r.split_once('/')?;
                if project != self.cfg.project {
                    return None;
                }
                r
            }
            None => rest,
        };
        let segs: Vec<&str> = rest.split('/').collect();
        match segs.as_slice() {
            ["global", coll, name] => Some((coll.to_string(), Scope::Global, name.to_string())),
            ["regions", r, coll, name] => Some((
                coll.to_string(),
                Scope::Region(r.to_string()),
                name.to_string(),
            )),
            ["zones", z, coll, name] => Some((
                coll.to_string(),
                Scope::Zone(z.to_string()),
                name.to_string(),
            )),
            _ => None,
        }
    }

    /// A reference to an existing resource of `kind`.
    pub(super) fn resolve(
        &self,
        kind: Kind,
        s: &str,
        default_scope: &Scope,
    ) -> Option<(Scope, String)> {
        let (coll, scope, name) = self.parse_ref(s, default_scope)?;
        if !coll.is_empty() && coll != kind.collection() {
            return None;
        }
        self.resources
            .contains_key(&(kind, scope.clone(), name.clone()))
            .then_some((scope, name))
    }

    pub(super) fn is_network(&self, s: &str) -> bool {
        matches!(self.parse_ref(s, &Scope::Global),
            Some((c, Scope::Global, n)) if (c.is_empty() || c == "networks") && n == self.cfg.network)
    }

    pub(super) fn is_subnetwork(&self, s: &str) -> bool {
        let region = Scope::Region(self.cfg.region.clone());
        matches!(self.parse_ref(s, &region),
            Some((c, sc, n)) if (c.is_empty() || c == "subnetworks") && sc == region && n == self.cfg.subnetwork.name)
    }

    pub fn check_scope(&self, scope: &Scope) -> Result<()> {
        match scope {
            Scope::Global => Ok(()),
            Scope::Region(r) if *r == self.cfg.region => Ok(()),
            Scope::Zone(z) if self.cfg.zones.contains(z) => Ok(()),
            other => Err(ApiError::not_found(&format!(
                "{}/{}",
                self.project_path(),
                other.path()
            ))),
        }
    }

    pub fn check_project(&self, project: &str) -> Result<()> {
        if project == self.cfg.project {
            Ok(())
        } else {
            Err(ApiError::not_found(&format!("projects/{project}")))
        }
    }
}
