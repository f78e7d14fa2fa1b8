//! Fileserver pair administration, behind `holdfast pair`: the VLDB's view of a pair
//! beside what each member says of itself, and a planned switchover.
//! Invariant: `pair_status` changes nothing and reports a silent member instead of
//! failing; a switchover is reported done only once the VLDB names another member active.

use std::time::{Duration, Instant};

use proto::{Epoch, ErrorCode, MemberState, PairEntry, PairName, ProtoError, Request, Response};
use tracing::info;

use crate::admin::Vos;
use crate::error::VosError;

/// How long `pair_status` waits for a member: a hung member must not hang the report.
const MEMBER_STATE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the active may take to hand over: flushing, releasing the lease and the
/// partner's takeover (opening the partition, recovering the state journal).
const SWITCHOVER_TIMEOUT: Duration = Duration::from_secs(30);

/// The VLDB's record of a pair and each member's own account.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairReport {
    pub pair: PairEntry,
    /// The members, the VLDB's active first.
    pub members: Vec<MemberReport>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemberReport {
    pub address: String,
    pub status: MemberStatus,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemberStatus {
    Answered(MemberState),
    /// No connection, or no answer in time: the error, as one line.
    Unreachable(String),
    /// The member answered with an error (an older fileserver, a wrong cell).
    Refused(ErrorCode),
}

/// The outcome of `pair_switchover`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwitchoverReport {
    pub pair: PairName,
    pub from: String,
    pub to: String,
    pub epoch: Epoch,
    /// From sending the switchover to reading the new active from the VLDB.
    pub elapsed: Duration,
}

impl Vos {
    /// The pair as the VLDB records it, and each member's role, epoch and grace state. A
    /// member that does not answer is part of the report, not a failure of it.
    pub async fn pair_status(&self, name: &str) -> Result<PairReport, VosError> {
        let pair = self.pair_entry(&parse_pair(name)?).await?;
        let mut members = Vec::with_capacity(pair.members.len());
        for address in active_first(&pair) {
            let status = self.member_state(&address).await;
            members.push(MemberReport { address, status });
        }
        Ok(PairReport { pair, members })
    }

    /// Asks the active member to hand the pair to its partner, and waits until the VLDB
    /// names the partner active.
    pub async fn pair_switchover(&self, name: &str) -> Result<SwitchoverReport, VosError> {
        let pair_name = parse_pair(name)?;
        let before = self.pair_entry(&pair_name).await?;
        let Some(from) = before.active.clone() else {
            return Err(VosError::NoActive {
                pair: name.into(),
                epoch: before.epoch,
            });
        };
        if before.members.len() < 2 {
            return Err(VosError::NoPartner {
                pair: name.into(),
                member: from,
            });
        }
        let started = Instant::now();
        let fileserver = self.fileserver_at(&from, self.timeout).await?;
        match fileserver
            .call_within(Request::PairSwitchover, SWITCHOVER_TIMEOUT)
            .await?
        {
            Response::Ok | Response::Pair(_) | Response::MemberState(_) => {}
            other => return Err(fileserver.unexpected(&other)),
        }
        let after = self.pair_entry(&pair_name).await?;
        let elapsed = started.elapsed();
        match after.active {
            Some(to) if to != from && after.epoch > before.epoch => {
                info!(pair = %pair_name, %from, %to, epoch = %after.epoch,
                    elapsed_ms = elapsed.as_millis(), "pair switched over");
                Ok(SwitchoverReport {
                    pair: pair_name,
                    from,
                    to,
                    epoch: after.epoch,
                    elapsed,
                })
            }
            active => Err(VosError::SwitchoverUnconfirmed {
                pair: name.into(),
                active: active.unwrap_or_else(|| "no member".into()),
                epoch: after.epoch,
            }),
        }
    }

    async fn pair_entry(&self, pair: &PairName) -> Result<PairEntry, VosError> {
        match self.vldb.get_pair(pair).await {
            Ok(entry) => Ok(entry),
            Err(ProtoError::Remote(ErrorCode::NoSuchPair)) => Err(VosError::NoSuchPair {
                pair: pair.to_string(),
            }),
            Err(e) => Err(self.vldb_error(e)),
        }
    }

    async fn member_state(&self, address: &str) -> MemberStatus {
        let timeout = self.timeout.min(MEMBER_STATE_TIMEOUT);
        let answer = match self.fileserver_at(address, timeout).await {
            Ok(fileserver) => match fileserver.call(Request::MemberState).await {
                Ok(Response::MemberState(state)) => Ok(state),
                Ok(other) => Err(fileserver.unexpected(&other)),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        };
        match answer {
            Ok(state) => MemberStatus::Answered(state),
            Err(VosError::Fileserver { code, .. }) => MemberStatus::Refused(code),
            Err(VosError::FileserverUnreachable { source, .. }) => {
                MemberStatus::Unreachable(source.to_string())
            }
            Err(other) => MemberStatus::Unreachable(other.to_string()),
        }
    }
}

fn parse_pair(name: &str) -> Result<PairName, VosError> {
    PairName::parse(name).map_err(|_| VosError::BadPairName { name: name.into() })
}

/// The members, the active first, then in the order they joined.
fn active_first(pair: &PairEntry) -> Vec<String> {
    let mut out: Vec<String> = pair.active.iter().cloned().collect();
    for member in &pair.members {
        if !out.contains(member) {
            out.push(member.clone());
        }
    }
    out
}
