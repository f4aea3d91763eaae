// prod-egress, in JavaScript (built with componentize-js): the seed's priority rule on
// enrichment tables, the same rule as transforms/prod-egress (Rust). `xpriority: "HIGH"` for a
// call into a production account (`env=prod` in the accounts table) from an address outside the
// corporate egress ranges (a CIDR table); a call from inside them gets `xnetwork` instead.
// Uses the `lookup` host import of trailhose:transform@0.2.0, so the module's `[[transforms]]`
// entry must grant both tables (`tables = ["accounts", "egress"]`).
//
// Config: `accounts_table` (default `accounts`), `egress_table` (default `egress`),
// `env_column` (default `env`), `prod` (default `prod`).

import { count, lookup } from 'trailhose:transform/host@0.2.0';

const KEYS = ['accounts_table', 'egress_table', 'env_column', 'prod'];
let conf = {};

// `result<_, string>`: returning is `ok`, throwing a string is `err` (start-up stops with it).
export function init(config) {
  const given = Object.fromEntries(config);
  const unknown = Object.keys(given).filter((k) => !KEYS.includes(k));
  if (unknown.length > 0) {
    throw `unknown config key(s): ${unknown.sort().join(', ')}`;
  }
  conf = {
    accounts: given.accounts_table ?? 'accounts',
    egress: given.egress_table ?? 'egress',
    envColumn: given.env_column ?? 'env',
    prod: given.prod ?? 'prod',
  };
}

export function process(events) {
  return events.map(one);
}

// A table row comes back as [column, value] pairs, or undefined when the key is absent.
function cell(row, column) {
  const hit = row.find(([c]) => c === column);
  return hit === undefined ? undefined : hit[1];
}

// An address, not a service name such as `ec2.amazonaws.com` (AWS acting for the account is
// never HIGH). A plain check: IPv4 dotted quad or anything with a colon (IPv6).
function isAddress(s) {
  return /^\d{1,3}(\.\d{1,3}){3}$/.test(s) || s.includes(':');
}

function one(event) {
  const ip = event.fields.sourceIpAddress;
  if (ip === undefined || !isAddress(ip)) {
    return { tag: 'keep' };
  }
  const account = event.fields.account;
  const row = account === undefined ? undefined : lookup(conf.accounts, account);
  if (row === undefined || cell(row, conf.envColumn) !== conf.prod) {
    return { tag: 'keep' };
  }
  const range = lookup(conf.egress, ip);
  if (range !== undefined) {
    count('prod_from_egress', 1n);
    const label = cell(range, 'label') ?? 'egress';
    return { tag: 'annotate', val: [{ key: 'xnetwork', value: JSON.stringify(label) }] };
  }
  return {
    tag: 'annotate',
    val: [
      { key: 'xpriority', value: '"HIGH"' },
      {
        key: 'xreason',
        value: JSON.stringify('production account called from outside the egress ranges'),
      },
    ],
  };
}
