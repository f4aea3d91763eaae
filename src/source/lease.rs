//! Shard leases in DynamoDB, after the KCL's design: one item per shard with an owner, a
//! counter the owner bumps to renew, and a checkpoint. Every change is a conditional write, so
//! two workers never both believe they hold a lease. A lease whose counter has not moved for
//! the lease duration (by the observer's own clock, so clocks need not agree) is expired and
//! may be taken; workers below their fair share take free and expired leases, then steal a
//! bounded number from the busiest worker. Stealing is a handoff: the thief names itself the
//! lease's next owner, the owner stops reading, lets what it read be written and checkpointed,
//! then passes the lease on, so a rebalance repeats nothing (unless the handoff times out).
//! A child shard's lease is taken only once every parent is checkpointed at SHARD_END, and it
//! starts at TRIM_HORIZON, so what was written to it while its parents drained is read.
//!
//! A shard's start is pinned in its lease (`startPosition`) the moment its first record is read,
//! so a rewind or a takeover before the first checkpoint goes back to that record, never to the
//! configured LATEST or AT_TIMESTAMP (which would skip what was read but not written).
//! Renewals, checkpoints and pins are all conditional on owner, counter and the holding's token
//! and bump the counter, serialised through the holder's `Claim`: a stale reader can never move
//! a checkpoint back.
//!
//! Each holding writes its own token (`holdingToken`, a fresh UUID per take) with the take. A
//! write whose answer was lost (a timeout, or an SDK retry of a write that was applied) leaves
//! the counter one ahead of the claim, so the next write's condition fails; the holder then
//! reads the lease back, and if owner and token are still its own, every change since was its
//! own (the KCL's spurious-failure check, exact even when a worker id is reused): it takes the
//! counter as read and writes again, instead of dropping a lease it still holds.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::AttributeValue;

use crate::metrics::{self, LeaseWriteRecovered};
use crate::source::kinesis::StartAt;

/// The checkpoint of a shard read to its end.
pub const SHARD_END: &str = "SHARD_END";

const KEY: &str = "leaseKey";
const OWNER: &str = "leaseOwner";
const COUNTER: &str = "leaseCounter";
const CHECKPOINT: &str = "checkpoint";
const PARENTS: &str = "parentShardIds";
const NEXT: &str = "nextOwner";
const START: &str = "startPosition";
const TOKEN: &str = "holdingToken";
/// How many times in a row a held lease's write is sent again after finding an earlier write
/// of its holding applied with the answer lost.
const LOST_ANSWER_RETRIES: usize = 3;
/// `startPosition` of a child shard's lease.
pub const TRIM_HORIZON: &str = "TRIM_HORIZON";
/// `startPosition` prefix of a shard pinned at its first record read.
const PINNED: &str = "AT_SEQUENCE_NUMBER:";
/// Expression aliases of the attributes above, for `LeaseTable::update`.
const ALIASES: [(&str, &str); 7] = [
    ("#k", KEY),
    ("#o", OWNER),
    ("#c", COUNTER),
    ("#p", CHECKPOINT),
    ("#n", NEXT),
    ("#s", START),
    ("#t", TOKEN),
];

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The shard id.
    pub key: String,
    pub owner: Option<String>,
    pub counter: u64,
    /// "" (not started: the configured initial position), a sequence number, or SHARD_END.
    pub checkpoint: String,
    pub parents: Vec<String>,
    /// A worker waiting for the owner to hand the lease over (rebalancing).
    pub next_owner: Option<String>,
    /// Where reading starts while there is no checkpoint: "" (the configured initial
    /// position), TRIM_HORIZON (a child shard), or the first record read (pinned).
    pub start: String,
    /// The current holding's token ("" when never taken).
    pub token: String,
}

impl Lease {
    pub fn finished(&self) -> bool {
        self.checkpoint == SHARD_END
    }

    /// Where a new holder reads from: after the checkpoint, else the pinned first record, else
    /// the lease's own start, else `initial` (the configured position).
    pub fn start_at(&self, initial: StartAt) -> StartAt {
        if !self.checkpoint.is_empty() {
            return StartAt::After(self.checkpoint.clone());
        }
        if let Some(seq) = self.start.strip_prefix(PINNED).filter(|s| !s.is_empty()) {
            return StartAt::At(seq.to_owned());
        }
        match self.start.as_str() {
            TRIM_HORIZON => StartAt::TrimHorizon,
            _ => initial,
        }
    }
}

/// One holding of a lease: its token and counter, shared by its renewer, the coordinator
/// (handoffs) and the shard's reader (pins, checkpoints). Every write is conditional on the
/// counter and token and bumps the counter, one at a time, so they never race each other into a
/// false conflict; a new holding gets a new claim (and token), so an old reader's writes fail.
#[derive(Debug)]
pub struct Claim {
    counter: tokio::sync::Mutex<u64>,
    token: String,
    /// When a write last proved the lease ours.
    renewed: Mutex<Instant>,
    /// The holding is over (lost, handed over, given up): no write of it goes out any more.
    revoked: AtomicBool,
    /// A write found the lease changed by someone else.
    lost: AtomicBool,
}

impl Claim {
    pub fn new(counter: u64, token: String) -> Claim {
        Claim {
            counter: tokio::sync::Mutex::new(counter),
            token,
            renewed: Mutex::new(Instant::now()),
            revoked: AtomicBool::new(false),
            lost: AtomicBool::new(false),
        }
    }

    pub fn token(&self) -> &str {
        &self.token
    }

    /// Ends the holding: every later write of this claim fails without being sent.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::Release);
    }

    pub fn revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }

    /// Whether a write found the lease taken by another worker or holding.
    pub fn lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    /// When the lease was last renewed (or checkpointed).
    pub fn renewed(&self) -> Instant {
        self.renewed.lock().map_or_else(|e| *e.into_inner(), |t| *t)
    }

    fn touch(&self, at: Instant) {
        if let Ok(mut t) = self.renewed.lock() {
            *t = at;
        }
    }
}

/// When each lease's counter was last seen to change, by this worker's clock.
#[derive(Debug, Default)]
pub struct Observer {
    seen: HashMap<String, (u64, Instant)>,
}

impl Observer {
    pub fn observe(&mut self, leases: &[Lease], now: Instant) {
        for l in leases {
            match self.seen.get(&l.key) {
                Some((c, _)) if *c == l.counter => {}
                _ => {
                    self.seen.insert(l.key.clone(), (l.counter, now));
                }
            }
        }
    }

    /// Owned, but its counter has not moved for `duration`.
    pub fn expired(&self, l: &Lease, now: Instant, duration: Duration) -> bool {
        l.owner.is_some()
            && self
                .seen
                .get(&l.key)
                .is_some_and(|(c, at)| *c == l.counter && now.duration_since(*at) >= duration)
    }
}

/// Whether every parent of a lease is done: its lease is at SHARD_END, or it has no lease and
/// is no longer in the stream (trimmed away).
pub fn parents_done(l: &Lease, by_key: &HashMap<&str, &Lease>, shards: &HashSet<String>) -> bool {
    l.parents.iter().all(|p| match by_key.get(p.as_str()) {
        Some(parent) => parent.finished(),
        None => !shards.contains(p),
    })
}

/// How a lease is to be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum How {
    Free,
    Expired,
    Stolen,
}

impl How {
    pub fn as_str(self) -> &'static str {
        match self {
            How::Free => "free",
            How::Expired => "expired",
            How::Stolen => "stolen",
        }
    }
}

/// The leases `me` should try to take now. `takeable` holds the leases that are not finished
/// and whose parents are done, with whether each is expired.
pub fn plan(me: &str, takeable: &[(&Lease, bool)], max_steal: usize) -> Vec<(String, How)> {
    // A lease being handed over counts for its next owner.
    let live_owner = |l: &Lease, expired: bool| match (&l.next_owner, &l.owner) {
        _ if expired => None,
        (Some(n), Some(_)) => Some(n.clone()),
        (_, o) => o.clone(),
    };
    let mut per_worker: BTreeMap<String, usize> = BTreeMap::new();
    per_worker.insert(me.to_owned(), 0);
    for (l, expired) in takeable {
        if let Some(o) = live_owner(l, *expired) {
            *per_worker.entry(o).or_default() += 1;
        }
    }
    let total = takeable.len();
    if total == 0 {
        return Vec::new();
    }
    let target = total.div_ceil(per_worker.len());
    let mine = per_worker.get(me).copied().unwrap_or(0);
    if mine >= target {
        return Vec::new();
    }
    let need = target - mine;
    let mut out: Vec<(String, How)> = Vec::new();
    for (l, _) in takeable {
        if out.len() >= need {
            break;
        }
        if l.owner.is_none() {
            out.push((l.key.clone(), How::Free));
        }
    }
    for (l, expired) in takeable {
        if out.len() >= need {
            break;
        }
        if l.owner.as_deref().is_some_and(|o| o != me) && *expired {
            out.push((l.key.clone(), How::Expired));
        }
    }
    if !out.is_empty() {
        return out;
    }
    // Nothing free: steal from the busiest worker, a little at a time.
    let Some((busiest, most)) = per_worker
        .iter()
        .filter(|(w, _)| w.as_str() != me)
        .max_by_key(|(w, n)| (**n, std::cmp::Reverse((*w).clone())))
        .map(|(w, n)| (w.clone(), *n))
    else {
        return out;
    };
    let steal = if most > target {
        need.min(most - target).min(max_steal)
    } else if need > 1 && most >= target {
        1.min(max_steal)
    } else {
        0
    };
    for (l, _) in takeable {
        if out.len() >= steal {
            break;
        }
        if l.owner.as_deref() == Some(busiest.as_str()) && l.next_owner.is_none() {
            out.push((l.key.clone(), How::Stolen));
        }
    }
    out
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    /// The condition failed: someone else changed the lease first.
    #[error("lease changed by another worker")]
    Conflict,
    #[error("lease table: {0}")]
    Call(String),
}

fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
    e: &aws_sdk_dynamodb::error::SdkError<E>,
) -> LeaseError {
    match e.code() {
        Some("ConditionalCheckFailedException") => LeaseError::Conflict,
        Some(c) => LeaseError::Call(format!("{c}: {}", e.message().unwrap_or_default())),
        None => LeaseError::Call(
            aws_sdk_dynamodb::error::DisplayErrorContext(e)
                .to_string()
                .chars()
                .take(300)
                .collect(),
        ),
    }
}

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: u64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn from_item(item: &HashMap<String, AttributeValue>) -> Option<Lease> {
    let key = item.get(KEY)?.as_s().ok()?.clone();
    let owner = item
        .get(OWNER)
        .and_then(|v| v.as_s().ok())
        .filter(|o| !o.is_empty())
        .cloned();
    let counter = item
        .get(COUNTER)
        .and_then(|v| v.as_n().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let checkpoint = item
        .get(CHECKPOINT)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default();
    let parents = item
        .get(PARENTS)
        .and_then(|v| v.as_s().ok())
        .map(|p| {
            p.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let next_owner = item
        .get(NEXT)
        .and_then(|v| v.as_s().ok())
        .filter(|o| !o.is_empty())
        .cloned();
    let start = item
        .get(START)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default();
    let token = item
        .get(TOKEN)
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default();
    Some(Lease {
        key,
        owner,
        counter,
        checkpoint,
        parents,
        next_owner,
        start,
        token,
    })
}

/// The lease table.
pub struct LeaseTable {
    client: aws_sdk_dynamodb::Client,
    pub table: String,
    pub me: String,
}

impl LeaseTable {
    pub fn new(shared: &aws_config::SdkConfig, table: &str, me: &str) -> LeaseTable {
        LeaseTable {
            client: aws_sdk_dynamodb::Client::new(shared),
            table: table.to_owned(),
            me: me.to_owned(),
        }
    }

    /// Creates the table (on-demand capacity) unless it exists; waits until it is active.
    pub async fn ensure(&self) -> Result<(), LeaseError> {
        use aws_sdk_dynamodb::types::*;
        let status = |d: &aws_sdk_dynamodb::operation::describe_table::DescribeTableOutput| {
            d.table()
                .and_then(|t| t.table_status())
                .is_some_and(|s| *s == TableStatus::Active)
        };
        match self
            .client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
        {
            Ok(d) if status(&d) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.code() == Some("ResourceNotFoundException") => {
                let attr = AttributeDefinition::builder()
                    .attribute_name(KEY)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(|e| LeaseError::Call(e.to_string()))?;
                let key = KeySchemaElement::builder()
                    .attribute_name(KEY)
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(|e| LeaseError::Call(e.to_string()))?;
                let created = self
                    .client
                    .create_table()
                    .table_name(&self.table)
                    .attribute_definitions(attr)
                    .key_schema(key)
                    .billing_mode(BillingMode::PayPerRequest)
                    .send()
                    .await;
                if let Err(e) = created {
                    // Another worker created it at the same time.
                    if e.code() != Some("ResourceInUseException") {
                        return Err(describe(&e));
                    }
                }
            }
            Err(e) => return Err(describe(&e)),
        }
        for _ in 0..120 {
            let d = self
                .client
                .describe_table()
                .table_name(&self.table)
                .send()
                .await
                .map_err(|e| describe(&e))?;
            if status(&d) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(LeaseError::Call(format!(
            "table {} did not become active",
            self.table
        )))
    }

    pub async fn scan(&self) -> Result<Vec<Lease>, LeaseError> {
        let mut out = Vec::new();
        let mut start: Option<HashMap<String, AttributeValue>> = None;
        loop {
            let resp = self
                .client
                .scan()
                .table_name(&self.table)
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| describe(&e))?;
            out.extend(resp.items().iter().filter_map(from_item));
            match resp.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => return Ok(out),
            }
        }
    }

    /// A lease for a newly seen shard, starting at `start` ("" = the configured position,
    /// or TRIM_HORIZON), with `checkpoint` ("" or SHARD_END); Ok(false) when it already exists.
    pub async fn create(
        &self,
        shard: &str,
        parents: &[String],
        start: &str,
        checkpoint: &str,
    ) -> Result<bool, LeaseError> {
        let mut req = self
            .client
            .put_item()
            .table_name(&self.table)
            .item(KEY, s(shard))
            .item(COUNTER, n(0))
            .item(CHECKPOINT, s(checkpoint))
            .item(PARENTS, s(&parents.join(",")));
        if !start.is_empty() {
            req = req.item(START, s(start));
        }
        let r = req
            .condition_expression("attribute_not_exists(#k)")
            .expression_attribute_names("#k", KEY)
            .send()
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) => match describe(&e) {
                LeaseError::Conflict => Ok(false),
                other => Err(other),
            },
        }
    }

    /// One conditional update of a shard's lease. `set` and `when` name attributes by alias
    /// (`#k` key, `#o` owner, `#c` counter, `#p` checkpoint, `#n` next owner, `#s` start, `#t`
    /// token); only the aliases used are sent, as DynamoDB rejects unused ones. A failed
    /// condition is `Conflict`.
    async fn update(
        &self,
        shard: &str,
        set: &str,
        when: &str,
        values: Vec<(&str, AttributeValue)>,
    ) -> Result<(), LeaseError> {
        let mut req = self
            .client
            .update_item()
            .table_name(&self.table)
            .key(KEY, s(shard))
            .update_expression(set)
            .condition_expression(when);
        for (alias, attr) in ALIASES {
            if set.contains(alias) || when.contains(alias) {
                req = req.expression_attribute_names(alias, attr);
            }
        }
        for (k, v) in values {
            req = req.expression_attribute_values(k, v);
        }
        req.send().await.map(|_| ()).map_err(|e| describe(&e))
    }

    /// One lease as stored now (a consistent read); None when it does not exist.
    pub async fn get(&self, shard: &str) -> Result<Option<Lease>, LeaseError> {
        let resp = self
            .client
            .get_item()
            .table_name(&self.table)
            .key(KEY, s(shard))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| describe(&e))?;
        Ok(resp.item().and_then(from_item))
    }

    /// Takes a lease as last seen (`counter`), a lease handed to this worker included: a new
    /// holding with its own token.
    pub async fn take(&self, shard: &str, counter: u64) -> Result<Claim, LeaseError> {
        let token = uuid::Uuid::now_v7().simple().to_string();
        let taken = self
            .update(
                shard,
                "SET #o = :me, #c = :next, #t = :t REMOVE #n",
                "attribute_exists(#k) AND #c = :c",
                vec![
                    (":me", s(&self.me)),
                    (":c", n(counter)),
                    (":next", n(counter + 1)),
                    (":t", s(&token)),
                ],
            )
            .await;
        match taken {
            Ok(()) => Ok(Claim::new(counter + 1, token)),
            // Applied, with the answer lost and the SDK's retry refused: still ours.
            Err(LeaseError::Conflict) => match self.get(shard).await? {
                Some(l) if l.owner.as_deref() == Some(self.me.as_str()) && l.token == token => {
                    Ok(Claim::new(l.counter, token))
                }
                _ => Err(LeaseError::Conflict),
            },
            Err(e) => Err(e),
        }
    }

    /// Asks the owner of a lease (as last seen, `counter`) to hand it over to this worker.
    pub async fn request_handoff(&self, shard: &str, counter: u64) -> Result<(), LeaseError> {
        self.update(
            shard,
            "SET #n = :me",
            "attribute_exists(#o) AND #c = :c AND attribute_not_exists(#n)",
            vec![(":me", s(&self.me)), (":c", n(counter))],
        )
        .await
    }

    /// A conditional write on a held lease: owner, `claim`'s counter and token must match, and
    /// the counter is bumped (so every write also renews). A failed condition with the lease
    /// still this holding's (owner and token) means an earlier write of it was applied with its
    /// answer lost: the write goes again at the counter read back.
    async fn claimed(
        &self,
        shard: &str,
        claim: &Claim,
        set: &str,
        when: &str,
        values: Vec<(&str, AttributeValue)>,
    ) -> Result<(), LeaseError> {
        let mut counter = claim.counter.lock().await;
        let set = format!(
            "SET #c = :next{}{set}",
            if set.is_empty() { "" } else { ", " }
        );
        let when = format!(
            "#o = :me AND #c = :c AND #t = :t{}{when}",
            if when.is_empty() { "" } else { " AND " }
        );
        // Each retry follows a read-back that found a write of this holding applied unseen;
        // the retry itself may be one (an SDK retry of it refused): so every conflict is
        // checked, a few times over (only this holding's own writes can move the counter while
        // owner and token stay, and they are serialised here).
        for attempt in 0..LOST_ANSWER_RETRIES + 1 {
            let recheck = attempt < LOST_ANSWER_RETRIES;
            if claim.revoked() {
                return Err(LeaseError::Conflict);
            }
            // Renewed as of the send: others count the lease's duration from their first sight
            // of the new counter, which is no earlier.
            let sent = Instant::now();
            let mut vals = values.clone();
            vals.extend([
                (":me", s(&self.me)),
                (":c", n(*counter)),
                (":next", n(*counter + 1)),
                (":t", s(&claim.token)),
            ]);
            match self.update(shard, &set, &when, vals).await {
                Ok(()) => {
                    *counter += 1;
                    claim.touch(sent);
                    return Ok(());
                }
                Err(LeaseError::Conflict) => {
                    if recheck
                        && let Some(l) = self.get(shard).await?
                        && l.owner.as_deref() == Some(self.me.as_str())
                        && l.token == claim.token
                        && l.counter != *counter
                    {
                        metrics::emit(LeaseWriteRecovered {
                            shard,
                            counter: l.counter,
                        });
                        *counter = l.counter;
                        continue;
                    }
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        claim.lost.store(true, Ordering::Release);
        Err(LeaseError::Conflict)
    }

    /// Passes a held lease to the worker that asked for it; returns nothing to keep.
    pub async fn hand_over(&self, shard: &str, claim: &Claim, to: &str) -> Result<(), LeaseError> {
        self.claimed(
            shard,
            claim,
            "#o = :to REMOVE #n",
            "#n = :to",
            vec![(":to", s(to))],
        )
        .await
    }

    /// Renews a held lease. Conflict = the lease is no longer ours.
    pub async fn renew(&self, shard: &str, claim: &Claim) -> Result<(), LeaseError> {
        self.claimed(shard, claim, "", "", Vec::new()).await
    }

    /// Records how far a shard is durably processed. Conflict = the lease is no longer ours.
    pub async fn checkpoint(
        &self,
        shard: &str,
        claim: &Claim,
        checkpoint: &str,
    ) -> Result<(), LeaseError> {
        self.claimed(shard, claim, "#p = :p", "", vec![(":p", s(checkpoint))])
            .await
    }

    /// Pins a shard without a checkpoint at its first record read (`seq`).
    pub async fn pin(&self, shard: &str, claim: &Claim, seq: &str) -> Result<(), LeaseError> {
        self.claimed(
            shard,
            claim,
            "#s = :s",
            "#p = :none",
            vec![(":s", s(&format!("{PINNED}{seq}"))), (":none", s(""))],
        )
        .await
    }

    /// Gives a lease up (shutdown, or its shard ended) so another worker takes it at once.
    pub async fn release(&self, shard: &str) -> Result<(), LeaseError> {
        self.update(
            shard,
            "REMOVE #o, #n SET #c = #c + :one",
            "#o = :me",
            vec![(":me", s(&self.me)), (":one", n(1))],
        )
        .await
    }

    /// Readiness: the table answers.
    pub async fn check(&self) -> Result<(), String> {
        self.client
            .describe_table()
            .table_name(&self.table)
            .send()
            .await
            .map(|_| ())
            .map_err(|e| describe(&e).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(key: &str, owner: Option<&str>) -> Lease {
        Lease {
            key: key.into(),
            owner: owner.map(Into::into),
            counter: 1,
            checkpoint: String::new(),
            parents: Vec::new(),
            next_owner: None,
            start: String::new(),
            token: String::new(),
        }
    }

    #[test]
    fn a_new_holder_starts_after_the_checkpoint_else_at_the_pin_else_the_leases_own_start() {
        let mut l = lease("s", None);
        assert_eq!(l.start_at(StartAt::Latest), StartAt::Latest);
        l.start = TRIM_HORIZON.into();
        assert_eq!(l.start_at(StartAt::Latest), StartAt::TrimHorizon);
        l.start = format!("{PINNED}42");
        assert_eq!(l.start_at(StartAt::Latest), StartAt::At("42".into()));
        l.checkpoint = "50".into();
        assert_eq!(l.start_at(StartAt::Latest), StartAt::After("50".into()));
    }

    fn run(me: &str, leases: &[Lease], expired: &[&str], steal: usize) -> Vec<(String, How)> {
        let t: Vec<(&Lease, bool)> = leases
            .iter()
            .map(|l| (l, expired.contains(&l.key.as_str())))
            .collect();
        plan(me, &t, steal)
    }

    #[test]
    fn a_lone_worker_takes_every_free_lease() {
        let ls: Vec<Lease> = (0..4).map(|i| lease(&format!("s{i}"), None)).collect();
        let got = run("a", &ls, &[], 1);
        assert_eq!(got.len(), 4);
        assert!(got.iter().all(|(_, h)| *h == How::Free));
    }

    #[test]
    fn a_new_worker_steals_one_at_a_time_down_to_a_fair_share() {
        let mut ls: Vec<Lease> = (0..6).map(|i| lease(&format!("s{i}"), Some("a"))).collect();
        // b and c join: target 2 each; only one lease is stolen per round.
        let got = run("b", &ls, &[], 1);
        assert_eq!(got, vec![("s0".into(), How::Stolen)]);
        ls[0].owner = Some("b".into());
        ls[1].owner = Some("b".into());
        ls[2].owner = Some("b".into());
        // a=3, b=3, c=0: c needs 2, busiest has 3 > 2.
        assert_eq!(run("c", &ls, &[], 1).len(), 1);
        // Balanced 2/2/2: nobody moves.
        ls[0].owner = Some("c".into());
        ls[3].owner = Some("c".into());
        for w in ["a", "b", "c"] {
            assert!(run(w, &ls, &[], 1).is_empty(), "{w}");
        }
        // 4 leases over 3 workers (target 2): 2/1/1 is stable, and 2/2/0 moves one.
        let four = vec![
            lease("s0", Some("a")),
            lease("s1", Some("a")),
            lease("s2", Some("b")),
            lease("s3", Some("b")),
        ];
        assert_eq!(run("c", &four, &[], 1).len(), 1);
    }

    #[test]
    fn leases_being_handed_over_count_for_their_next_owner_and_are_not_stolen_twice() {
        let mut ls: Vec<Lease> = (0..4).map(|i| lease(&format!("s{i}"), Some("a"))).collect();
        ls[0].next_owner = Some("b".into());
        // b already has one coming: it needs one more (target 2), stolen from a, not s0.
        assert_eq!(run("b", &ls, &[], 1), vec![("s1".into(), How::Stolen)]);
        ls[1].next_owner = Some("b".into());
        assert!(run("b", &ls, &[], 1).is_empty());
        assert!(run("a", &ls, &[], 1).is_empty(), "a keeps its fair share");
    }

    #[test]
    fn expired_leases_are_taken_before_stealing() {
        let ls = vec![
            lease("s0", Some("a")),
            lease("s1", Some("dead")),
            lease("s2", Some("dead")),
            lease("s3", Some("a")),
        ];
        // "dead" does not count as a worker: a and b share 4, target 2.
        let got = run("b", &ls, &["s1", "s2"], 1);
        assert_eq!(
            got,
            vec![("s1".into(), How::Expired), ("s2".into(), How::Expired)]
        );
    }

    #[test]
    fn expiry_is_judged_by_the_observers_clock() {
        let mut o = Observer::default();
        let t0 = Instant::now();
        let mut l = lease("s0", Some("a"));
        o.observe(std::slice::from_ref(&l), t0);
        let d = Duration::from_secs(10);
        assert!(!o.expired(&l, t0 + Duration::from_secs(9), d));
        assert!(o.expired(&l, t0 + Duration::from_secs(10), d));
        l.counter += 1; // renewed
        o.observe(std::slice::from_ref(&l), t0 + Duration::from_secs(10));
        assert!(!o.expired(&l, t0 + Duration::from_secs(15), d));
        assert!(
            !o.expired(&lease("new", None), t0 + d * 5, d),
            "free is not expired"
        );
    }

    #[test]
    fn children_wait_for_their_parents() {
        let mut parent = lease("p", Some("a"));
        let mut child = lease("c", None);
        child.parents = vec!["p".into()];
        let shards: HashSet<String> = ["p".to_owned(), "c".to_owned()].into();
        let by_key: HashMap<&str, &Lease> = [("p", &parent), ("c", &child)].into();
        assert!(!parents_done(&child, &by_key, &shards));
        parent.checkpoint = SHARD_END.into();
        let by_key: HashMap<&str, &Lease> = [("p", &parent), ("c", &child)].into();
        assert!(parents_done(&child, &by_key, &shards));
        // A parent trimmed from the stream (no lease, not listed) is done.
        let mut orphan = lease("o", None);
        orphan.parents = vec!["gone".into()];
        assert!(parents_done(&orphan, &by_key, &shards));
    }
}
