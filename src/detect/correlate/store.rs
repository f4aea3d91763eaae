//! Correlation state: per correlation, group and window, the set of what was counted
//! (eventIDs for `event_count`, values for `value_count`, rule names for `temporal`) and which
//! event fired the window's alert. Two stores with one behaviour: this process's memory, or
//! one DynamoDB item per state, updated atomically (`ADD` to a string set under a condition)
//! so that every worker sees the same counts.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::AttributeValue;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("correlation table {table}: {message}")]
    Call { table: String, message: String },
    /// Not called: the table failed just now (`Breaker`).
    #[error("correlation table {table}: not called while it is failing (a probe call follows)")]
    Unavailable { table: String },
}

/// One update: add `member` to the state at `key` unless it is there or the set is full.
pub struct Update<'a> {
    pub key: &'a str,
    pub member: &'a str,
    /// Members kept at most: past it nothing the condition asks can change.
    pub cap: usize,
    pub expires_at: i64,
    /// Kept beside the state for people reading the table.
    pub correlation: &'a str,
    pub window_start: i64,
    pub group: &'a str,
}

/// A state after an update (or as it was, when the member was there already or the set full).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub members: BTreeSet<String>,
    /// The eventID that claimed the window's alert.
    pub fired_by: Option<String>,
}

#[derive(Debug)]
pub struct Kept {
    state: State,
    expires_at: i64,
    /// When it was added (a counter): of states expiring together, the older goes first.
    seq: u64,
}

/// Memory states one correlation keeps at most; past it expired ones are swept, then the
/// oldest windows' evicted (counted: their counts are lost, a detection may be missed).
const STATES_MAX: usize = 100_000;
/// States one correlation may keep however small its share of the budget.
const STATES_MIN: usize = 10;
/// Members (about 64 bytes each) all of a process's in-memory correlations keep together by
/// default (`detect.correlation.max_members`). Group-by values are input, so without a bound
/// memory would not be bounded; the budget is shared evenly among the correlations.
pub const MAX_MEMBERS: usize = 2_000_000;

/// The states a memory store keeps for sets of at most `cap` members, within `budget` members.
fn states_max(cap: usize, budget: usize) -> usize {
    (budget / cap.max(1)).clamp(STATES_MIN, STATES_MAX)
}

/// Makes room in a full memory store: expired states go, then (when still more than 90% full)
/// the states that expire first, oldest first among equals, down to 80%, so that a sweep runs
/// once per many adds. Returns how many unexpired states were evicted.
fn make_room(m: &mut HashMap<String, Kept>, max: usize, now: i64) -> usize {
    m.retain(|_, k| k.expires_at > now);
    if m.len() < max - max / 10 {
        return 0;
    }
    let before = m.len();
    let drop = before.saturating_sub(max - max / 5);
    if drop == 0 {
        return 0;
    }
    // (expiry, insertion) is unique per state, so exactly `drop` go, even when many states
    // expire at the same second (one window's groups all do).
    let mut order: Vec<(i64, u64)> = m.values().map(|k| (k.expires_at, k.seq)).collect();
    let (_, cut, _) = order.select_nth_unstable(drop - 1);
    let cut = *cut;
    m.retain(|_, k| (k.expires_at, k.seq) > cut);
    before - m.len()
}

/// One correlation's memory states.
#[derive(Debug)]
pub struct Mem {
    states: HashMap<String, Kept>,
    /// The next state's `seq`.
    next: u64,
    /// Members this correlation may keep: its share of `total`.
    budget: usize,
    /// The members all correlations share (`detect.correlation.max_members`).
    total: usize,
}

/// Stops calls to a table that keeps failing, so that a hung or unreachable endpoint costs
/// one call's timeout (10 s) now and then instead of one per matched event. Each failure is
/// a call that failed after the SDK's own retries (three attempts with backoff), so one
/// throttled or dropped request does not open it: only `BREAKER_AFTER` failed calls in a row
/// do, and a success between them starts the count again. Open, it stays so for a second,
/// doubling per failed probe up to 30 s; then one call probes while the others fail at once,
/// and a success closes it.
#[derive(Debug)]
pub struct Breaker {
    state: Mutex<BreakerState>,
    base: Duration,
}

#[derive(Debug)]
struct BreakerState {
    open_until: Option<Instant>,
    probing: bool,
    backoff: Duration,
    /// Failed calls since the last success.
    failures: u32,
    /// Bumped at every open and close: a permit from before says nothing about the state
    /// since (a call admitted while closed, answering after the breaker opened).
    epoch: u64,
}

const BREAKER_BASE: Duration = Duration::from_secs(1);
const BREAKER_MAX: Duration = Duration::from_secs(30);
/// Failed calls in a row (each after the SDK's retries) that open the breaker. At one
/// matched event per call, five is a table failing for several seconds, not a blip.
pub const BREAKER_AFTER: u32 = 5;

/// Leave to make one call: say how it went (`succeeded`, `failed`). Dropped unsaid (its
/// call's future was dropped, e.g. cancelled), a probe lets the next call probe instead,
/// so the breaker never stays open for good.
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    said: bool,
    epoch: u64,
}

impl Permit<'_> {
    pub fn succeeded(mut self) {
        self.said = true;
        let b = self.breaker;
        let mut s = b.lock();
        let stale = self.epoch != s.epoch;
        match s.open_until {
            // Open: only its probe closes it, not a call admitted before it opened.
            Some(_) if stale || !self.probe => {}
            Some(_) => {
                s.open_until = None;
                s.probing = false;
                s.failures = 0;
                s.backoff = b.base;
                s.epoch += 1;
            }
            None => {
                s.failures = 0;
                s.backoff = b.base;
            }
        }
    }

    /// The call failed at `now`: how long the breaker is open now, if it opened.
    pub fn failed(mut self, now: Instant) -> Option<Duration> {
        self.said = true;
        let b = self.breaker;
        let mut s = b.lock();
        let current_probe = self.probe && self.epoch == s.epoch;
        // A failed probe keeps it open, for longer; while closed, only `BREAKER_AFTER`
        // failures in a row open it. A call admitted before it opened changes nothing.
        let opens = match s.open_until {
            Some(_) if current_probe => {
                s.probing = false;
                true
            }
            Some(_) => false,
            // Admitted before the last open/close: it says nothing of the window since.
            None if self.epoch != s.epoch => false,
            None => {
                s.failures = s.failures.saturating_add(1);
                s.failures >= BREAKER_AFTER
            }
        };
        if !opens {
            return None;
        }
        let open = s.backoff;
        s.open_until = Some(now + open);
        s.backoff = (open * 2).min(BREAKER_MAX.max(b.base));
        s.epoch += 1;
        Some(open)
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe && !self.said {
            let mut s = self.breaker.lock();
            // Only the probe in flight: an older one's drop must not let a second probe in.
            if s.epoch == self.epoch {
                s.probing = false;
            }
        }
    }
}

impl Breaker {
    pub fn new(base: Duration) -> Breaker {
        Breaker {
            state: Mutex::new(BreakerState {
                open_until: None,
                probing: false,
                backoff: base,
                failures: 0,
                epoch: 0,
            }),
            base,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BreakerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Leave for a call at `now`: closed, or open and due for its one probe.
    pub fn admit(&self, now: Instant) -> Option<Permit<'_>> {
        let mut s = self.lock();
        let probe = match s.open_until {
            None => false,
            Some(until) if now < until || s.probing => return None,
            Some(_) => {
                s.probing = true;
                true
            }
        };
        Some(Permit {
            breaker: self,
            probe,
            said: false,
            epoch: s.epoch,
        })
    }
}

/// One correlation's store. A memory store is one correlation's states alone, so that a rule
/// reload can hand them to the same correlation in the new set (`Arc`); a DynamoDB store is a
/// client of the one table, cloned for each correlation.
#[derive(Clone)]
pub enum Store {
    Memory(Arc<Mutex<Mem>>),
    Dynamo {
        client: aws_sdk_dynamodb::Client,
        table: String,
        /// Shared by every correlation's clone: the table fails for all of them.
        breaker: Arc<Breaker>,
    },
}

/// One DynamoDB attempt, and a call with the SDK's retries (three attempts, backoff).
const CALL_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

const KEY: &str = "pk";
const MEMBERS: &str = "members";
const FIRED_BY: &str = "fired_by";
const EXPIRES: &str = "expires_at";

fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

fn n(v: i64) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn state_of(item: &HashMap<String, AttributeValue>) -> State {
    State {
        members: item
            .get(MEMBERS)
            .and_then(|v| v.as_ss().ok())
            .map(|m| m.iter().cloned().collect())
            .unwrap_or_default(),
        fired_by: item.get(FIRED_BY).and_then(|v| v.as_s().ok()).cloned(),
    }
}

impl Store {
    /// A memory store within the default budget (`MAX_MEMBERS`).
    pub fn memory() -> Store {
        Store::memory_within(MAX_MEMBERS)
    }

    /// A memory store whose correlations share `total` members.
    pub fn memory_within(total: usize) -> Store {
        Store::Memory(Arc::new(Mutex::new(Mem {
            states: HashMap::new(),
            next: 0,
            budget: total,
            total,
        })))
    }

    fn mem(m: &Mutex<Mem>) -> std::sync::MutexGuard<'_, Mem> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A store for one more correlation of the same kind: empty memory (within the same
    /// total), or the same table.
    pub fn fresh(&self) -> Store {
        match self {
            Store::Memory(m) => Store::memory_within(Store::mem(m).total),
            Store::Dynamo { .. } => self.clone(),
        }
    }

    /// Gives a memory store its share of the total: one of `correlations` equal shares.
    pub fn share(&self, correlations: usize) {
        if let Store::Memory(m) = self {
            let mut m = Store::mem(m);
            m.budget = m.total / correlations.max(1);
        }
    }

    /// Whether two stores hold the same states (a carried-over memory store).
    pub fn same(&self, other: &Store) -> bool {
        match (self, other) {
            (Store::Memory(a), Store::Memory(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }

    /// States held in memory (0 for DynamoDB).
    pub fn held(&self) -> usize {
        match self {
            Store::Memory(m) => Store::mem(m).states.len(),
            Store::Dynamo { .. } => 0,
        }
    }

    /// Members held in memory across all states (0 for DynamoDB).
    #[cfg(test)]
    pub fn members(&self) -> usize {
        match self {
            Store::Memory(m) => Store::mem(m)
                .states
                .values()
                .map(|k| k.state.members.len())
                .sum(),
            Store::Dynamo { .. } => 0,
        }
    }

    /// The DynamoDB store, its table created (on-demand, TTL on `expires_at`) if missing.
    pub async fn dynamo(shared: &aws_config::SdkConfig, table: &str) -> Result<Store, StoreError> {
        let store = Store::dynamo_unchecked(shared, table, CALL_ATTEMPT_TIMEOUT, CALL_TIMEOUT);
        store.ensure().await?;
        Ok(store)
    }

    /// The DynamoDB store as it is (no table check), with these timeouts.
    pub(crate) fn dynamo_unchecked(
        shared: &aws_config::SdkConfig,
        table: &str,
        attempt: Duration,
        call: Duration,
    ) -> Store {
        // The SDK sets no overall timeout: a hung endpoint would block a worker for good. A
        // call that times out fails the notification's hold, which comes back (at-least-once).
        let timeouts = aws_sdk_dynamodb::config::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(attempt)
            .operation_timeout(call)
            .build();
        let conf = aws_sdk_dynamodb::config::Builder::from(shared)
            .timeout_config(timeouts)
            .build();
        Store::Dynamo {
            client: aws_sdk_dynamodb::Client::from_conf(conf),
            table: table.to_owned(),
            breaker: Arc::new(Breaker::new(BREAKER_BASE)),
        }
    }

    fn table(&self) -> String {
        match self {
            Store::Memory(_) => "(memory)".to_owned(),
            Store::Dynamo { table, .. } => table.clone(),
        }
    }

    fn fail(&self, message: String) -> StoreError {
        StoreError::Call {
            table: self.table(),
            message,
        }
    }

    /// Runs one table call through the breaker: not at all while it is open, and enough
    /// failures in a row open it.
    async fn guarded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        let Store::Dynamo { table, breaker, .. } = self else {
            return call.await;
        };
        let Some(permit) = breaker.admit(Instant::now()) else {
            return Err(StoreError::Unavailable {
                table: table.clone(),
            });
        };
        let out = call.await;
        match &out {
            Ok(_) => permit.succeeded(),
            Err(_) => {
                if let Some(open) = permit.failed(Instant::now()) {
                    crate::metrics::emit(crate::metrics::CorrelationBreakerOpened {
                        table,
                        secs: open.as_secs_f64(),
                    });
                }
            }
        }
        out
    }

    fn describe<E: ProvideErrorMetadata + std::error::Error + 'static>(
        &self,
        e: &aws_sdk_dynamodb::error::SdkError<E>,
    ) -> StoreError {
        self.fail(match e.code() {
            Some(c) => format!("{c}: {}", e.message().unwrap_or_default()),
            None => aws_sdk_dynamodb::error::DisplayErrorContext(e)
                .to_string()
                .chars()
                .take(300)
                .collect(),
        })
    }

    async fn ensure(&self) -> Result<(), StoreError> {
        use aws_sdk_dynamodb::types::*;
        let Store::Dynamo { client, table, .. } = self else {
            return Ok(());
        };
        let active = |d: &aws_sdk_dynamodb::operation::describe_table::DescribeTableOutput| {
            d.table()
                .and_then(|t| t.table_status())
                .is_some_and(|s| *s == TableStatus::Active)
        };
        match client.describe_table().table_name(table).send().await {
            Ok(d) if active(&d) => return Ok(()),
            Ok(_) => {}
            Err(e) if e.code() == Some("ResourceNotFoundException") => {
                let attr = AttributeDefinition::builder()
                    .attribute_name(KEY)
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(|e| self.fail(e.to_string()))?;
                let key = KeySchemaElement::builder()
                    .attribute_name(KEY)
                    .key_type(KeyType::Hash)
                    .build()
                    .map_err(|e| self.fail(e.to_string()))?;
                let created = client
                    .create_table()
                    .table_name(table)
                    .attribute_definitions(attr)
                    .key_schema(key)
                    .billing_mode(BillingMode::PayPerRequest)
                    .send()
                    .await;
                match created {
                    Ok(_) => {
                        let ttl = TimeToLiveSpecification::builder()
                            .enabled(true)
                            .attribute_name(EXPIRES)
                            .build()
                            .map_err(|e| self.fail(e.to_string()))?;
                        // Waits for the table to be active on AWS; best effort (the state
                        // is correct without TTL, only kept longer).
                        for _ in 0..60 {
                            let set = client
                                .update_time_to_live()
                                .table_name(table)
                                .time_to_live_specification(ttl.clone())
                                .send()
                                .await;
                            if set.is_ok() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    }
                    // Another worker created it at the same time.
                    Err(e) if e.code() == Some("ResourceInUseException") => {}
                    Err(e) => return Err(self.describe(&e)),
                }
            }
            Err(e) => return Err(self.describe(&e)),
        }
        for _ in 0..120 {
            let d = client
                .describe_table()
                .table_name(table)
                .send()
                .await
                .map_err(|e| self.describe(&e))?;
            if active(&d) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        Err(self.fail("did not become active".into()))
    }

    /// Adds `u.member` to its state (unless there already, or the set is full) and returns
    /// the state: one conditional `UpdateItem` on DynamoDB.
    pub async fn add(&self, u: &Update<'_>, now: i64) -> Result<State, StoreError> {
        match self {
            Store::Memory(m) => {
                let mut m = Store::mem(m);
                let max = states_max(u.cap, m.budget);
                if m.states.len() >= max && !m.states.contains_key(u.key) {
                    let evicted = make_room(&mut m.states, max, now);
                    if evicted > 0 {
                        crate::metrics::emit(crate::metrics::CorrelationStatesEvicted {
                            correlation: u.correlation,
                            states: evicted,
                        });
                    }
                }
                let seq = m.next;
                m.next += 1;
                let kept = m.states.entry(u.key.to_owned()).or_insert_with(|| Kept {
                    state: State {
                        members: BTreeSet::new(),
                        fired_by: None,
                    },
                    expires_at: u.expires_at,
                    seq,
                });
                kept.expires_at = kept.expires_at.max(u.expires_at);
                if kept.state.members.len() < u.cap {
                    kept.state.members.insert(u.member.to_owned());
                }
                Ok(kept.state.clone())
            }
            Store::Dynamo { .. } => self.guarded(self.add_item(u)).await,
        }
    }

    /// `add` on DynamoDB: one conditional `UpdateItem` (and a read only when an old SDK
    /// answers a failed condition without the item).
    async fn add_item(&self, u: &Update<'_>) -> Result<State, StoreError> {
        let Store::Dynamo { client, table, .. } = self else {
            return Err(self.fail("add_item on memory".into()));
        };
        let resp = client
            .update_item()
            .table_name(table)
            .key(KEY, s(u.key))
            .update_expression("ADD #m :m SET #e = :e, #c = :c, #w = :w, #g = :g")
            .condition_expression(
                "attribute_not_exists(#m) OR (NOT contains(#m, :v) AND size(#m) < :cap)",
            )
            .expression_attribute_names("#m", MEMBERS)
            .expression_attribute_names("#e", EXPIRES)
            .expression_attribute_names("#c", "correlation")
            .expression_attribute_names("#w", "window_start")
            .expression_attribute_names("#g", "group")
            .expression_attribute_values(":m", AttributeValue::Ss(vec![u.member.to_owned()]))
            .expression_attribute_values(":v", s(u.member))
            .expression_attribute_values(":cap", n(u.cap as i64))
            .expression_attribute_values(":e", n(u.expires_at))
            .expression_attribute_values(":c", s(u.correlation))
            .expression_attribute_values(":w", n(u.window_start))
            .expression_attribute_values(":g", s(u.group))
            .return_values(aws_sdk_dynamodb::types::ReturnValue::AllNew)
            .return_values_on_condition_check_failure(
                aws_sdk_dynamodb::types::ReturnValuesOnConditionCheckFailure::AllOld,
            )
            .send()
            .await;
        match resp {
            Ok(out) => Ok(out.attributes().map(state_of).unwrap_or(State {
                members: BTreeSet::from([u.member.to_owned()]),
                fired_by: None,
            })),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => {
                let old = e.as_service_error().and_then(|se| match se {
                    aws_sdk_dynamodb::operation::update_item::UpdateItemError::ConditionalCheckFailedException(c) => c.item().map(state_of),
                    _ => None,
                });
                match old {
                    Some(state) => Ok(state),
                    None => self.get(u.key).await,
                }
            }
            Err(e) => Err(self.describe(&e)),
        }
    }

    /// A state as it is (strongly consistent read).
    async fn get(&self, key: &str) -> Result<State, StoreError> {
        let Store::Dynamo { client, table, .. } = self else {
            return Err(self.fail("get on memory".into()));
        };
        let out = client
            .get_item()
            .table_name(table)
            .key(KEY, s(key))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| self.describe(&e))?;
        Ok(out.item().map(state_of).unwrap_or(State {
            members: BTreeSet::new(),
            fired_by: None,
        }))
    }

    /// Claims the window's alert for `event_id`: true when it is now (or already was) this
    /// event's, so that exactly one event fires it, and fires it again when redelivered.
    pub async fn claim(&self, key: &str, event_id: &str) -> Result<bool, StoreError> {
        match self {
            Store::Memory(m) => {
                let mut m = Store::mem(m);
                let Some(kept) = m.states.get_mut(key) else {
                    return Ok(false);
                };
                let by = kept
                    .state
                    .fired_by
                    .get_or_insert_with(|| event_id.to_owned());
                Ok(by == event_id)
            }
            Store::Dynamo { .. } => self.guarded(self.claim_item(key, event_id)).await,
        }
    }

    async fn claim_item(&self, key: &str, event_id: &str) -> Result<bool, StoreError> {
        let Store::Dynamo { client, table, .. } = self else {
            return Err(self.fail("claim_item on memory".into()));
        };
        let resp = client
            .update_item()
            .table_name(table)
            .key(KEY, s(key))
            .update_expression("SET #f = :f")
            .condition_expression("attribute_exists(#k) AND (attribute_not_exists(#f) OR #f = :f)")
            .expression_attribute_names("#f", FIRED_BY)
            .expression_attribute_names("#k", KEY)
            .expression_attribute_values(":f", s(event_id))
            .send()
            .await;
        match resp {
            Ok(_) => Ok(true),
            Err(e) if e.code() == Some("ConditionalCheckFailedException") => Ok(false),
            Err(e) => Err(self.describe(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn update<'a>(key: &'a str, member: &'a str) -> Update<'a> {
        Update {
            key,
            member,
            cap: 3,
            expires_at: 100,
            correlation: "c",
            window_start: 0,
            group: "[]",
        }
    }

    #[tokio::test]
    async fn memory_counts_each_member_once_up_to_the_cap_and_one_event_claims() {
        let s = Store::memory();
        let n = |st: State| st.members.len();
        assert_eq!(n(s.add(&update("k", "a"), 0).await.expect("add")), 1);
        assert_eq!(
            n(s.add(&update("k", "a"), 0).await.expect("add")),
            1,
            "again"
        );
        assert_eq!(n(s.add(&update("k", "b"), 0).await.expect("add")), 2);
        assert_eq!(n(s.add(&update("k", "c"), 0).await.expect("add")), 3);
        assert_eq!(n(s.add(&update("k", "d"), 0).await.expect("add")), 3, "cap");
        assert_eq!(n(s.add(&update("other", "a"), 0).await.expect("add")), 1);
        assert!(s.claim("k", "c").await.expect("claim"));
        assert!(s.claim("k", "c").await.expect("claim"), "redelivered");
        assert!(!s.claim("k", "d").await.expect("claim"), "once per state");
        assert!(!s.claim("missing", "d").await.expect("claim"));
        let st = s.add(&update("k", "e"), 0).await.expect("add");
        assert_eq!(st.fired_by.as_deref(), Some("c"));
    }

    #[tokio::test]
    async fn memory_stays_bounded_when_every_group_is_new() {
        let s = Store::memory();
        let cap = 4_001;
        let max = states_max(cap, MAX_MEMBERS);
        assert_eq!(max, 499);
        for i in 0..(max * 5) {
            let key = format!("k{i}");
            let mut u = update(&key, "a");
            u.cap = cap;
            // Later groups expire later: the oldest go first.
            u.expires_at = 1_000 + i as i64;
            s.add(&u, 0).await.expect("add");
            assert!(s.held() <= max, "{} states after {i}", s.held());
        }
        let Store::Memory(m) = &s else {
            panic!("memory")
        };
        let has = |k: &str| Store::mem(m).states.contains_key(k);
        assert!(has(&format!("k{}", max * 5 - 1)), "the newest stays");
        assert!(!has("k0"), "the oldest went");
        // Expired states go first, and nothing unexpired when they make room.
        let s = Store::memory();
        for i in 0..max {
            let key = format!("old{i}");
            let mut u = update(&key, "a");
            u.cap = cap;
            u.expires_at = 10;
            s.add(&u, 0).await.expect("add");
        }
        let mut u = update("new", "a");
        u.cap = cap;
        u.expires_at = 1_000;
        s.add(&u, 20).await.expect("add");
        assert_eq!(s.held(), 1);
        assert_eq!(states_max(6, MAX_MEMBERS), STATES_MAX);
    }

    #[tokio::test]
    async fn states_expiring_together_are_evicted_oldest_first_and_only_as_many_as_needed() {
        // One window's groups all expire at the same second: eviction must not empty the store.
        let s = Store::memory();
        let cap = 4_001;
        let max = states_max(cap, MAX_MEMBERS);
        for i in 0..=max {
            let key = format!("k{i}");
            let mut u = update(&key, "a");
            u.cap = cap;
            u.expires_at = 1_000;
            s.add(&u, 0).await.expect("add");
        }
        // Full at `max`: the next new state evicted down to 80%, then was added.
        assert_eq!(s.held(), max - max / 5 + 1, "only as many as needed");
        let Store::Memory(m) = &s else {
            panic!("memory")
        };
        let has = |k: &str| Store::mem(m).states.contains_key(k);
        assert!(!has("k0"), "the oldest of equals went first");
        assert!(has(&format!("k{}", max - 1)) && has(&format!("k{max}")));
    }

    #[tokio::test]
    async fn the_member_budget_is_shared_among_correlations() {
        let base = Store::memory_within(10_000);
        let (a, b) = (base.fresh(), base.fresh());
        for s in [&a, &b] {
            s.share(2);
        }
        // Each of two correlations keeps 5,000 members: 1,250 states of 4 (cap 4).
        for i in 0..3_000 {
            let key = format!("k{i}");
            let mut u = update(&key, "a");
            u.cap = 4;
            u.expires_at = 1_000 + i;
            a.add(&u, 0).await.expect("add");
            assert!(a.held() <= 1_250, "{} states", a.held());
        }
        assert!(a.held() > 1_000);
        assert_eq!(b.held(), 0);
        assert_eq!(states_max(4, 10), STATES_MIN, "never fewer than STATES_MIN");
    }

    /// Fails `n` calls at `now` through `b`; returns what the last one said.
    fn fail_calls(b: &Breaker, n: u32, now: Instant) -> Option<Duration> {
        let mut open = None;
        for _ in 0..n {
            open = b.admit(now).expect("closed").failed(now);
        }
        open
    }

    #[test]
    fn the_breaker_opens_after_failures_in_a_row_lets_one_probe_through_and_closes_on_success() {
        let b = Breaker::new(Duration::from_secs(1));
        let t0 = Instant::now();
        // One throttled call (or four) does not stop the others.
        assert_eq!(fail_calls(&b, BREAKER_AFTER - 1, t0), None);
        assert!(b.admit(t0).is_some(), "still closed");
        // A success starts the count again.
        b.admit(t0).expect("closed").succeeded();
        assert_eq!(
            fail_calls(&b, BREAKER_AFTER - 1, t0),
            None,
            "counted afresh"
        );
        assert_eq!(fail_calls(&b, 1, t0), Some(Duration::from_secs(1)), "opens");
        assert!(b.admit(t0).is_none(), "open");
        let later = t0 + Duration::from_millis(1_500);
        let probe = b.admit(later).expect("the probe");
        assert!(b.admit(later).is_none(), "one probe at a time");
        assert_eq!(probe.failed(later), Some(Duration::from_secs(2)), "doubles");
        assert!(b.admit(later + Duration::from_secs(1)).is_none());
        let much_later = later + Duration::from_secs(3);
        b.admit(much_later).expect("probe").succeeded();
        assert!(
            b.admit(much_later).is_some() && b.admit(much_later).is_some(),
            "closed"
        );
        assert_eq!(fail_calls(&b, BREAKER_AFTER - 1, much_later), None, "reset");
        let mut open = None;
        for i in 1..=10 {
            // Each time past the open window: the call is a probe, and it fails.
            let t = much_later + Duration::from_secs(100 * i);
            open = b.admit(t).expect("due").failed(t);
        }
        assert_eq!(open, Some(BREAKER_MAX), "bounded");
    }

    #[test]
    fn calls_admitted_before_the_breaker_opened_or_closed_change_nothing_after() {
        let b = Breaker::new(Duration::from_secs(1));
        let t0 = Instant::now();
        // Admitted while closed; it answers only after five others opened the breaker.
        let early = b.admit(t0).expect("closed");
        let early_failing = b.admit(t0).expect("closed");
        assert!(fail_calls(&b, BREAKER_AFTER, t0).is_some(), "opens");
        let later = t0 + Duration::from_secs(2);
        let probe = b.admit(later).expect("the probe");
        early.succeeded();
        assert!(
            b.admit(later).is_none(),
            "a stale success does not close it"
        );
        assert_eq!(
            early_failing.failed(later),
            None,
            "nor does a stale failure count"
        );
        assert!(b.admit(later).is_none(), "still one probe");
        assert_eq!(
            probe.failed(later),
            Some(Duration::from_secs(2)),
            "the probe decides"
        );
        // A probe of the previous open window, dropped now, lets no second probe in.
        let t2 = later + Duration::from_secs(3);
        let old_probe = b.admit(t2).expect("probe");
        assert_eq!(old_probe.failed(t2), Some(Duration::from_secs(4)));
        let t3 = t2 + Duration::from_secs(5);
        let probe = b.admit(t3).expect("probe");
        let stale_probe = Permit {
            breaker: &b,
            probe: true,
            said: false,
            epoch: 0,
        };
        drop(stale_probe);
        assert!(b.admit(t3).is_none(), "the live probe still holds the slot");
        let before_close = b.admit(t3).map(|_| ());
        assert!(before_close.is_none());
        probe.succeeded();
        assert!(b.admit(t3).is_some(), "closed");
        // Calls admitted while it was open long ago and failing now do not reopen it.
        let stale = Permit {
            breaker: &b,
            probe: false,
            said: false,
            epoch: 0,
        };
        assert_eq!(stale.failed(t3), None);
        assert_eq!(
            fail_calls(&b, BREAKER_AFTER - 1, t3),
            None,
            "the stale failure did not count"
        );
    }

    #[test]
    fn a_dropped_probe_lets_the_next_call_probe() {
        let b = Breaker::new(Duration::from_secs(1));
        let t0 = Instant::now();
        fail_calls(&b, BREAKER_AFTER, t0);
        let later = t0 + Duration::from_secs(2);
        // The probing call's future is dropped (a cancelled task) before it answers.
        drop(b.admit(later).expect("the probe"));
        let next = b.admit(later).expect("another probe, not open for good");
        assert!(b.admit(later).is_none(), "still one at a time");
        next.succeeded();
        assert!(b.admit(later).is_some(), "closed");
    }

    #[tokio::test]
    async fn a_hung_table_costs_one_timeout_and_is_not_called_again_while_open() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // An endpoint that accepts connections and never answers.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = accepted.clone();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            for conn in listener.incoming().flatten() {
                seen.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        });
        let shared = aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new("us-east-1"))
            .endpoint_url(format!("http://127.0.0.1:{port}"))
            .credentials_provider(aws_sdk_dynamodb::config::SharedCredentialsProvider::new(
                aws_sdk_dynamodb::config::Credentials::new("k", "s", None, None, "test"),
            ))
            .build();
        let store = Store::dynamo_unchecked(
            &shared,
            "hung",
            Duration::from_millis(200),
            Duration::from_millis(700),
        );
        // A breaker that stays open for the whole test, so that nothing here races the clock;
        // failed `BREAKER_AFTER - 1` times already, so that the first call opens it.
        let breaker = Breaker::new(Duration::from_secs(3_600));
        fail_calls(&breaker, BREAKER_AFTER - 1, Instant::now());
        let store = match store {
            Store::Dynamo { client, table, .. } => Store::Dynamo {
                client,
                table,
                breaker: Arc::new(breaker),
            },
            memory => memory,
        };
        let first = store.add(&update("k", "a"), 0).await;
        assert!(matches!(first, Err(StoreError::Call { .. })), "{first:?}");
        assert!(
            accepted.load(Ordering::SeqCst) >= 1,
            "the first call reached the endpoint"
        );
        // Unavailable is answered before any I/O: no timeout, no connection.
        for member in ["b", "c", "d"] {
            let next = store.add(&update("k", member), 0).await;
            assert!(
                matches!(next, Err(StoreError::Unavailable { .. })),
                "{next:?}"
            );
        }
        let claim = store.fresh().claim("k", "a").await;
        assert!(
            matches!(claim, Err(StoreError::Unavailable { .. })),
            "every correlation's clone shares the breaker: {claim:?}"
        );
    }
}
