//! Correlation state: per correlation, group and window, the set of what was counted
//! (eventIDs for `event_count`, values for `value_count`, rule names for `temporal`) and which
//! event fired the window's alert. Two stores with one behaviour: this process's memory, or
//! one DynamoDB item per state, updated atomically (`ADD` to a string set under a condition)
//! so that every worker sees the same counts.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_dynamodb::error::ProvideErrorMetadata;
use aws_sdk_dynamodb::types::AttributeValue;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("correlation table {table}: {message}")]
    Call { table: String, message: String },
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
}

/// Memory states one correlation keeps at most; past it expired ones are swept, then the
/// oldest windows' evicted (counted: their counts are lost, a detection may be missed).
const STATES_MAX: usize = 100_000;
/// Members one correlation keeps in memory at most (about 64 bytes each): with a high
/// threshold, fewer states. Group-by values are input, so without it memory would not be
/// bounded.
const MEMBERS_BUDGET: usize = 2_000_000;

/// The states a memory store keeps for sets of at most `cap` members.
fn states_max(cap: usize) -> usize {
    (MEMBERS_BUDGET / cap.max(1)).clamp(100, STATES_MAX)
}

/// Makes room in a full memory store: expired states go, then (when still more than 90% full)
/// the states that expire first, down to 80%, so that a sweep runs once per many adds.
/// Returns how many unexpired states were evicted.
fn make_room(m: &mut HashMap<String, Kept>, max: usize, now: i64) -> usize {
    m.retain(|_, k| k.expires_at > now);
    if m.len() < max - max / 10 {
        return 0;
    }
    let before = m.len();
    let drop = before - (max - max / 5);
    let mut ends: Vec<i64> = m.values().map(|k| k.expires_at).collect();
    let (_, cut, _) = ends.select_nth_unstable(drop);
    let cut = *cut;
    m.retain(|_, k| k.expires_at > cut);
    before - m.len()
}

/// One correlation's store. A memory store is one correlation's states alone, so that a rule
/// reload can hand them to the same correlation in the new set (`Arc`); a DynamoDB store is a
/// client of the one table, cloned for each correlation.
#[derive(Clone)]
pub enum Store {
    Memory(Arc<Mutex<HashMap<String, Kept>>>),
    Dynamo {
        client: aws_sdk_dynamodb::Client,
        table: String,
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
    pub fn memory() -> Store {
        Store::Memory(Arc::new(Mutex::new(HashMap::new())))
    }

    /// A store for one more correlation of the same kind: empty memory, or the same table.
    pub fn fresh(&self) -> Store {
        match self {
            Store::Memory(_) => Store::memory(),
            Store::Dynamo { .. } => self.clone(),
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
            Store::Memory(m) => m.lock().unwrap_or_else(|p| p.into_inner()).len(),
            Store::Dynamo { .. } => 0,
        }
    }

    /// The DynamoDB store, its table created (on-demand, TTL on `expires_at`) if missing.
    pub async fn dynamo(shared: &aws_config::SdkConfig, table: &str) -> Result<Store, StoreError> {
        // The SDK sets no overall timeout: a hung endpoint would block a worker for good. A
        // call that times out fails the notification's hold, which comes back (at-least-once).
        let timeouts = aws_sdk_dynamodb::config::timeout::TimeoutConfig::builder()
            .operation_attempt_timeout(CALL_ATTEMPT_TIMEOUT)
            .operation_timeout(CALL_TIMEOUT)
            .build();
        let conf = aws_sdk_dynamodb::config::Builder::from(shared)
            .timeout_config(timeouts)
            .build();
        let store = Store::Dynamo {
            client: aws_sdk_dynamodb::Client::from_conf(conf),
            table: table.to_owned(),
        };
        store.ensure().await?;
        Ok(store)
    }

    fn fail(&self, message: String) -> StoreError {
        let table = match self {
            Store::Memory(_) => "(memory)".to_owned(),
            Store::Dynamo { table, .. } => table.clone(),
        };
        StoreError::Call { table, message }
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
        let Store::Dynamo { client, table } = self else {
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
                let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
                let max = states_max(u.cap);
                if m.len() >= max && !m.contains_key(u.key) {
                    let evicted = make_room(&mut m, max, now);
                    if evicted > 0 {
                        crate::metrics::emit(crate::metrics::CorrelationStatesEvicted {
                            correlation: u.correlation,
                            states: evicted,
                        });
                    }
                }
                let kept = m.entry(u.key.to_owned()).or_insert_with(|| Kept {
                    state: State {
                        members: BTreeSet::new(),
                        fired_by: None,
                    },
                    expires_at: u.expires_at,
                });
                kept.expires_at = kept.expires_at.max(u.expires_at);
                if kept.state.members.len() < u.cap {
                    kept.state.members.insert(u.member.to_owned());
                }
                Ok(kept.state.clone())
            }
            Store::Dynamo { client, table } => {
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
                    .expression_attribute_values(
                        ":m",
                        AttributeValue::Ss(vec![u.member.to_owned()]),
                    )
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
        }
    }

    /// A state as it is (strongly consistent read).
    async fn get(&self, key: &str) -> Result<State, StoreError> {
        let Store::Dynamo { client, table } = self else {
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
                let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
                let Some(kept) = m.get_mut(key) else {
                    return Ok(false);
                };
                let by = kept
                    .state
                    .fired_by
                    .get_or_insert_with(|| event_id.to_owned());
                Ok(by == event_id)
            }
            Store::Dynamo { client, table } => {
                let resp = client
                    .update_item()
                    .table_name(table)
                    .key(KEY, s(key))
                    .update_expression("SET #f = :f")
                    .condition_expression(
                        "attribute_exists(#k) AND (attribute_not_exists(#f) OR #f = :f)",
                    )
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
        let max = states_max(cap);
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
        let has = |k: &str| m.lock().expect("lock").contains_key(k);
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
        assert_eq!(states_max(6), STATES_MAX);
    }
}
