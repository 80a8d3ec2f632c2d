//! Projects: the unit every tenant object belongs to, with its zone, quota
//! and usage.

use allod_raft::{KvError, KvRead, KvWrite};
use serde::{Deserialize, Serialize};

use super::quotas::{Quota, Usage};
use super::zones::Zone;
use super::{
    domain, get_json, put_json, validate_description, validate_name, ErrorCode, Outcome, ReadError,
    StateView, PREFIX_PROJECTS, PREFIX_USER_GRANTS, PREFIX_VMS, PREFIX_VOLUMES,
};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Project {
    pub name: String,
    pub description: String,
    /// Fixed at creation.
    #[serde(default)]
    pub zone: Zone,
    pub created_at_ms: u64,
    /// Bumped by every change, so clients can tell versions apart.
    pub generation: u64,
    /// Limits set by a cluster admin; absent ones are unlimited.
    #[serde(default)]
    pub quota: Quota,
    /// What the project's objects use, kept with every change to them.
    #[serde(default)]
    pub usage: Usage,
}
pub(super) fn create_project(
    kv: &mut KvWrite<'_>,
    name: String,
    description: String,
    now_ms: u64,
    zone: Zone,
) -> Result<Outcome, KvError> {
    Ok({
        let key = format!("{PREFIX_PROJECTS}{name}");
        match validate_name("project", &name).and_then(|_| validate_description(&description)) {
            Err(e) => Err(e),
            Ok(()) if kv.get(&key)?.is_some() => Err(domain(
                ErrorCode::AlreadyExists,
                format!("project {name:?} already exists"),
            )),
            Ok(()) => {
                let project = Project {
                    name,
                    description,
                    zone,
                    created_at_ms: now_ms,
                    generation: 1,
                    quota: Default::default(),
                    usage: Default::default(),
                };
                put_json(kv, &key, &project)?;
                Ok(serde_json::to_value(&project).expect("serialisable"))
            }
        }
    })
}

pub(super) fn update_project(
    kv: &mut KvWrite<'_>,
    name: String,
    description: String,
) -> Result<Outcome, KvError> {
    Ok({
        let key = format!("{PREFIX_PROJECTS}{name}");
        match (
            validate_description(&description),
            get_json::<Project>(kv, &key)?,
        ) {
            (Err(e), _) => Err(e),
            (Ok(()), None) => Err(domain(
                ErrorCode::NotFound,
                format!("project {name:?} does not exist"),
            )),
            (Ok(()), Some(mut project)) => {
                project.description = description;
                project.generation += 1;
                put_json(kv, &key, &project)?;
                Ok(serde_json::to_value(&project).expect("serialisable"))
            }
        }
    })
}

pub(super) fn delete_project(kv: &mut KvWrite<'_>, name: String) -> Result<Outcome, KvError> {
    Ok({
        let key = format!("{PREFIX_PROJECTS}{name}");
        let volumes = kv.scan(&format!("{PREFIX_VOLUMES}{name}/"))?.len()
            + kv.scan(&format!("{PREFIX_VMS}{name}/"))?.len();
        let network = super::network::project_leftovers(kv, &name)?;
        if kv.get(&key)?.is_none() {
            Err(domain(
                ErrorCode::NotFound,
                format!("project {name:?} does not exist"),
            ))
        } else if volumes > 0 {
            Err(domain(
                ErrorCode::FailedPrecondition,
                format!(
                    "project {name:?} still has {volumes} VM(s) or volume(s); delete them first"
                ),
            ))
        } else if !network.is_empty() {
            // Left behind, they would hold addresses nobody could see or
            // release any more.
            Err(domain(
                ErrorCode::FailedPrecondition,
                format!(
                    "project {name:?} still has {}; delete them first",
                    network.join(", ")
                ),
            ))
        } else {
            kv.delete(&key)?;
            super::network::delete_project_network(kv, &name)?;
            // Roles in a deleted project go with it.
            for (grant_key, _) in kv.scan(PREFIX_USER_GRANTS)? {
                if grant_key.rsplit('/').next() == Some(name.as_str()) {
                    kv.delete(&grant_key)?;
                }
            }
            Ok(serde_json::Value::Null)
        }
    })
}

pub(super) fn set_quota(
    kv: &mut KvWrite<'_>,
    project: String,
    quota: Quota,
) -> Result<Outcome, KvError> {
    Ok({
        let key = format!("{PREFIX_PROJECTS}{project}");
        match get_json::<Project>(kv, &key)? {
            None => Err(domain(
                ErrorCode::NotFound,
                format!("project {project:?} does not exist"),
            )),
            Some(mut record) => {
                // Lowering a limit below the usage is allowed: what
                // exists stays, new objects are refused.
                record.quota = quota;
                record.generation += 1;
                put_json(kv, &key, &record)?;
                Ok(serde_json::to_value(&record).expect("serialisable"))
            }
        }
    })
}

impl StateView {
    pub fn project(&self, name: &str) -> Result<Option<Project>, ReadError> {
        self.get(&format!("{PREFIX_PROJECTS}{name}"))
    }

    pub fn projects(&self) -> Result<Vec<Project>, ReadError> {
        self.list(PREFIX_PROJECTS)
    }
}
