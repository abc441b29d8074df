"""Alerts: rules on a group's (and model's) figures, evaluated by the server, delivered
to webhooks and exported as Prometheus alerting rules.

* :mod:`.rules`: the pure core (kinds, thresholds, hysteresis, the state machine);
* :mod:`.figures`: each rule's figure over its window, from the database;
* :mod:`.service`: the evaluator loop (state compare-and-set, events, audit, metrics);
* :mod:`.webhook`: delivery with retries and backoff, from the events table;
* :mod:`.payload`: the webhook body and where the window's samples are;
* :mod:`.prometheus`: the rules as a Prometheus alerting-rules file.
"""

from fleet_server.alerts.rules import Figure, Kind, Rule, RuleError, RuleState, Status, Transition

__all__ = ["Figure", "Kind", "Rule", "RuleError", "RuleState", "Status", "Transition"]
