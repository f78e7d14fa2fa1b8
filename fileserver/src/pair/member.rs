//! A pair member's role machine: passive until it wins the VLDB lease, then active behind
//! the fence while it renews, until it loses the lease, hands over or stops.
//! Invariant: the fence is open only while `MemberLease` is valid, measured from the send
//! time of the call the VLDB granted, so the member stops before the partner may start.

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::{Epoch, ErrorCode, PairEntry, PairName, PeerKind, ProtoError, VldbClient};
use state::{MemberLease, Millis};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::service::{MemberService, SwitchoverRequest};
use crate::active::Active;
use crate::config::{Config, PairConfig};
use crate::error::{FileServerError, JOURNAL_FAILED_LATE};
use crate::fence::{self, Fence};
use crate::history::History;
use crate::state_journal::JournalStop;
use crate::storage::server_id_of;

const JOIN_BACKOFF_FIRST: Duration = Duration::from_millis(200);
const JOIN_BACKOFF_MAX: Duration = Duration::from_secs(10);
/// How often a switchover looks whether the partner took over.
const SWITCHOVER_POLL: Duration = Duration::from_millis(20);

/// Runs a pair member on `listener` until `shutdown`.
pub async fn run(
    config: Config,
    pair: PairConfig,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), FileServerError> {
    let path = config.partition.clone();
    let server = tokio::task::spawn_blocking(move || server_id_of(&path))
        .await
        .map_err(|e| FileServerError::Task(e.to_string()))??;
    let member = match config.advertise.first() {
        Some(address) => address.clone(),
        None => listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default(),
    };
    let fence = Arc::new(Fence::closed());
    let history = config.history.as_deref().map(History::open).transpose()?;
    let (switchover, mut switchovers) = mpsc::channel(1);
    let service = Arc::new(MemberService::member(
        &config,
        member.clone(),
        server,
        fence.clone(),
        history,
        switchover,
    ));
    info!(pair = %pair.name.as_str(), %member, %server, "pair member serving (passive)");
    let serving = tokio::spawn(proto::server::serve(
        listener,
        service.clone(),
        config.connection_limits.clone(),
        config.transport.clone(),
        shutdown.clone(),
    ));
    // Each call must end well within a lease: a renewal that takes longer is useless.
    let timeout = config.vldb_timeout.min(pair.lease / 2);
    let vldb = VldbClient::new(
        config.cell.clone(),
        config.transport.clone(),
        PeerKind::FileServer { server },
        timeout,
    );
    let machine = Machine {
        config: &config,
        pair: &pair,
        member: &member,
        vldb: &vldb,
        fence: &fence,
        service: &service,
    };
    let mut result = Ok(());
    if machine.join(server, &mut shutdown).await {
        while let Some((epoch, sent)) = machine.passive(&mut shutdown, &mut switchovers).await {
            match machine
                .active(epoch, sent, &mut shutdown, &mut switchovers)
                .await
            {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    result = Err(e);
                    serving.abort();
                    break;
                }
            }
        }
    }
    fence.close();
    let _ = serving.await;
    info!(pair = %pair.name.as_str(), %member, "pair member stopped");
    result
}

/// The role machine. Passive (`passive`): answer `NotActive`, watch the pair in the VLDB
/// and acquire the lease (compare-and-set on the epoch seen) once it is free, expired or
/// handed to this member. Active (`active`): open the partition behind the fence
/// (recovery and grace as after a restart), renew every quarter lease, and on a lost or
/// unrenewed lease close the fence, drop the term without writing and go passive. A
/// planned switchover (`switch_over`) drains requests, hands the state over and names the
/// partner. A state journal that fails ends the term and the process, whose lease then
/// runs out as after a `kill -9`; one that is fenced ends the term like a lost lease.
struct Machine<'a> {
    config: &'a Config,
    pair: &'a PairConfig,
    member: &'a str,
    vldb: &'a VldbClient,
    fence: &'a Arc<Fence>,
    service: &'a Arc<MemberService>,
}

/// How an active term ended.
enum TermEnd {
    Fenced(&'static str),
    /// The state journal failed: the fence is closed for good.
    JournalFailed(String),
    /// An admin asked to hand the pair to `partner`.
    Switchover {
        answer: SwitchoverRequest,
        partner: String,
    },
    Shutdown,
}

impl Machine<'_> {
    fn name(&self) -> &PairName {
        &self.pair.name
    }

    /// Joins the pair, retrying with backoff; false on shutdown.
    async fn join(&self, server: proto::ServerId, shutdown: &mut watch::Receiver<bool>) -> bool {
        let mut backoff = JOIN_BACKOFF_FIRST;
        loop {
            let joined = tokio::select! {
                joined = self.vldb.join_pair(self.name(), server, self.member) => joined,
                () = stopped(shutdown) => return false,
            };
            match joined {
                Ok(()) => {
                    info!(pair = %self.name().as_str(), member = self.member, "joined the pair");
                    return true;
                }
                Err(e) => warn!(error = %e, retry_in = ?backoff, "could not join the pair"),
            }
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = stopped(shutdown) => return false,
            }
            backoff = (backoff * 2).min(JOIN_BACKOFF_MAX);
        }
    }

    /// Waits passively until this member wins the lease: returns the granted epoch and
    /// when the granting call was sent; `None` on shutdown.
    async fn passive(
        &self,
        shutdown: &mut watch::Receiver<bool>,
        switchovers: &mut mpsc::Receiver<SwitchoverRequest>,
    ) -> Option<(Epoch, Millis)> {
        let poll = self.pair.lease / 4;
        loop {
            let mut wait = poll;
            match self.vldb.get_pair(self.name()).await {
                Ok(entry) => {
                    self.service
                        .become_passive(entry.epoch, entry.active.clone());
                    if self.may_acquire(&entry) {
                        let sent = fence::now();
                        match self
                            .vldb
                            .acquire_pair(self.name(), self.member, entry.epoch, self.pair.lease)
                            .await
                        {
                            Ok((epoch, _)) => return Some((epoch, sent)),
                            Err(ProtoError::Remote(ErrorCode::LeaseHeld { .. })) => {}
                            Err(e) => warn!(error = %e, "acquiring the pair lease failed"),
                        }
                    } else if entry.lease_left_ms > 0 {
                        // Look again exactly when the lease can have run out.
                        wait = wait.min(Duration::from_millis(entry.lease_left_ms + 1));
                    }
                }
                Err(e) => warn!(error = %e, "could not read the pair from the VLDB"),
            }
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                Some(answer) = switchovers.recv() => {
                    let _ = answer.send(Err(ErrorCode::NotActive { epoch: Epoch(0), hint: None }));
                }
                () = stopped(shutdown) => return None,
            }
        }
    }

    /// The lease is free, run out, or handed to this member (a successor named for
    /// another member keeps it reserved for that one).
    fn may_acquire(&self, entry: &PairEntry) -> bool {
        match entry.successor.as_deref() {
            Some(successor) => successor == self.member,
            None => entry.active.is_none() || entry.lease_left_ms == 0,
        }
    }

    /// One active term; returns false once the member should stop, an error once it
    /// must stop because its state journal failed.
    async fn active(
        &self,
        epoch: Epoch,
        sent: Millis,
        shutdown: &mut watch::Receiver<bool>,
        switchovers: &mut mpsc::Receiver<SwitchoverRequest>,
    ) -> Result<bool, FileServerError> {
        let started = Instant::now();
        let mut lease = MemberLease::new(self.pair.lease, self.pair.lease / 5);
        lease.granted(epoch.0, sent);
        self.extend_fence(&lease);
        let (active, recovered) = match Active::open(self.config, self.fence.clone(), epoch).await {
            Ok(opened) => opened,
            Err(e) => {
                self.fence.close();
                warn!(error = %e, epoch = epoch.0, "could not take over; giving the lease up");
                let _ = self
                    .vldb
                    .release_pair(self.name(), self.member, epoch, None)
                    .await;
                return Ok(!*shutdown.borrow());
            }
        };
        self.service.become_active(epoch, active.service.clone());
        info!(
            "took over pair={} epoch={} in {} ms (volumes={} clients={} locks={} callbacks={} clean_handover={})",
            self.name().as_str(),
            epoch.0,
            started.elapsed().as_millis(),
            recovered.volumes,
            recovered.clients,
            recovered.locks,
            recovered.callbacks,
            recovered.clean_handover,
        );
        let end = self
            .serve_term(
                epoch,
                &mut lease,
                active.journal_stopped(),
                shutdown,
                switchovers,
            )
            .await;
        let go_on = match end {
            TermEnd::Fenced(reason) => {
                self.step_down(epoch, active);
                info!(
                    "fenced: pair={} epoch={} member={} ({reason})",
                    self.name().as_str(),
                    epoch.0,
                    self.member
                );
                true
            }
            TermEnd::JournalFailed(reason) => {
                // The writer closed the fence for good already.
                self.step_down(epoch, active);
                // The lease is not given up: writes that passed the fence just before it
                // closed may still land, and the lease's margin is what covers them.
                return Err(FileServerError::JournalFailed(reason));
            }
            TermEnd::Switchover { answer, partner } => {
                let result = self.switch_over(epoch, &mut lease, active, &partner).await;
                if let Err(code) = &result {
                    warn!(%code, "switchover failed");
                }
                let _ = answer.send(result);
                true
            }
            TermEnd::Shutdown => {
                active.close().await;
                self.fence.close();
                let _ = self
                    .vldb
                    .release_pair(self.name(), self.member, epoch, None)
                    .await;
                false
            }
        };
        // The journal may have failed while the term ended (a switchover's handover, the
        // close at shutdown) with nobody waiting for its stop any more.
        if self.fence.is_closed_for_good() {
            return Err(FileServerError::JournalFailed(JOURNAL_FAILED_LATE.into()));
        }
        Ok(go_on)
    }

    /// Renews until the term ends.
    async fn serve_term(
        &self,
        epoch: Epoch,
        lease: &mut MemberLease,
        journal_stopped: impl Future<Output = JournalStop>,
        shutdown: &mut watch::Receiver<bool>,
        switchovers: &mut mpsc::Receiver<SwitchoverRequest>,
    ) -> TermEnd {
        let every = self.pair.lease / 4;
        let mut journal_stopped = std::pin::pin!(journal_stopped);
        let mut next_renewal = tokio::time::Instant::now() + every;
        loop {
            let Some(deadline) = lease.valid_until().map(fence::instant_at) else {
                return TermEnd::Fenced("lease given up");
            };
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => {
                    return TermEnd::Fenced("lease ran out before a renewal");
                }
                () = tokio::time::sleep_until(next_renewal) => {
                    next_renewal = tokio::time::Instant::now() + every;
                    let sent = fence::now();
                    // The deadline first: an answer that arrives after it is not taken,
                    // so a member never acts again on a lease it had let run out.
                    let renewed = tokio::select! {
                        biased;
                        () = tokio::time::sleep_until(deadline) => {
                            return TermEnd::Fenced("lease ran out during a renewal");
                        }
                        renewed = self.vldb.renew_pair(self.name(), self.member, epoch, self.pair.lease) => renewed,
                    };
                    match renewed {
                        Ok((granted, _)) => {
                            lease.granted(granted.0, sent);
                            self.extend_fence(lease);
                        }
                        Err(ProtoError::Remote(ErrorCode::LeaseLost { .. })) => {
                            lease.lost();
                            return TermEnd::Fenced("the VLDB says the lease is lost");
                        }
                        Err(e) => warn!(error = %e, "renewing the pair lease failed"),
                    }
                }
                Some(answer) = switchovers.recv() => {
                    match self.partner().await {
                        Ok(partner) => return TermEnd::Switchover { answer, partner },
                        Err(code) => {
                            let _ = answer.send(Err(code));
                        }
                    }
                }
                why = &mut journal_stopped => return match why {
                    JournalStop::Fenced => TermEnd::Fenced("the state journal was fenced"),
                    JournalStop::Failed(reason) => TermEnd::JournalFailed(reason),
                },
                () = stopped(shutdown) => return TermEnd::Shutdown,
            }
        }
    }

    /// The other member of the pair, which a switchover hands over to.
    async fn partner(&self) -> Result<String, ErrorCode> {
        let entry = self.vldb.get_pair(self.name()).await.map_err(|e| match e {
            ProtoError::Remote(code) => code,
            other => ErrorCode::Internal(format!("read the pair from the VLDB: {other}")),
        })?;
        entry
            .members
            .into_iter()
            .find(|m| m != self.member)
            .ok_or_else(|| ErrorCode::Internal("the pair has no other member to switch to".into()))
    }

    /// A planned switchover to `partner`: renew once (so the steps below run well inside
    /// the lease), stop admitting and drain, snapshot with the handover mark, close, give
    /// the lease to `partner` and wait until it is active.
    async fn switch_over(
        &self,
        epoch: Epoch,
        lease: &mut MemberLease,
        active: Active,
        partner: &str,
    ) -> Result<(), ErrorCode> {
        let started = Instant::now();
        let sent = fence::now();
        match self
            .vldb
            .renew_pair(self.name(), self.member, epoch, self.pair.lease)
            .await
        {
            Ok((granted, _)) => {
                lease.granted(granted.0, sent);
                self.extend_fence(lease);
            }
            Err(e) => {
                self.step_down(epoch, active);
                return Err(ErrorCode::Internal(format!(
                    "renew before the switchover failed, member fenced: {e}"
                )));
            }
        }
        let drained = self.service.drain(self.pair.lease / 4).await;
        let marked = if drained {
            active.hand_over(epoch).await
        } else {
            warn!("requests still in flight: the partner will run grace");
            active.close().await;
            false
        };
        self.fence.close();
        self.service.become_passive(epoch, Some(partner.to_owned()));
        self.service.line(epoch, "released");
        self.vldb
            .release_pair(self.name(), self.member, epoch, Some(partner))
            .await
            .map_err(|e| ErrorCode::Internal(format!("release the pair lease: {e}")))?;
        // The partner polls every quarter lease; give it a few polls and a takeover.
        let deadline = Instant::now() + self.pair.lease * 2 + self.config.vldb_timeout;
        loop {
            if let Ok(entry) = self.vldb.get_pair(self.name()).await
                && entry.epoch > epoch
                && entry.active.as_deref() == Some(partner)
            {
                info!(
                    pair = %self.name().as_str(), from = self.member, to = partner,
                    epoch = entry.epoch.0, clean = marked,
                    took_ms = started.elapsed().as_millis() as u64,
                    "switched over"
                );
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(ErrorCode::Internal(format!(
                    "{partner} did not take the pair over in time"
                )));
            }
            tokio::time::sleep(SWITCHOVER_POLL).await;
        }
    }

    /// Ends the term without writing anything more: the fence closes, requests are
    /// answered `NotActive`, the term's state is dropped, and the history says so.
    fn step_down(&self, epoch: Epoch, active: Active) {
        self.fence.close();
        self.service.become_passive(epoch, None);
        active.abandon();
        self.service.line(epoch, "fenced");
    }

    fn extend_fence(&self, lease: &MemberLease) {
        match lease.valid_until() {
            Some(until) => self.fence.open_until(until),
            None => self.fence.close(),
        }
    }
}

/// Resolves once `shutdown` turns true (or its sender is gone). Yields `()` rather than
/// the watch's guard, which must not live across the awaits of other select branches.
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
