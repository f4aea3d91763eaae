;; A trailhose:transform component with two linear memories, written by hand (Rust cannot make
;; one): on every `process` it grows each memory by 48 MiB, then keeps every event. Each memory
;; alone stays under `max_memory_mb = 64`; together they pass it, so the host, which sums all
;; memories of an instance, must stop it with `memory_limit`. Under `max_memory_mb = 128` it
;; passes. The tests parse this file with the `wat` crate.
(component
  (core module $second
    (memory (export "memory") 1)
    (func (export "grow") (param i32) (result i32)
      (memory.grow (local.get 0))))

  (core module $main
    (import "second" "grow" (func $grow_second (param i32) (result i32)))
    (memory (export "memory") 2)
    (global $next (mut i32) (i32.const 1024))

    ;; A bump allocator for the host's copies of the arguments.
    (func (export "realloc") (param $old i32) (param $old_size i32) (param $align i32)
      (param $size i32) (result i32)
      (local $at i32)
      (local.set $at
        (i32.and
          (i32.add (global.get $next) (i32.sub (local.get $align) (i32.const 1)))
          (i32.sub (i32.const 0) (local.get $align))))
      (global.set $next (i32.add (local.get $at) (local.get $size)))
      (if (i32.gt_u (global.get $next) (i32.shl (memory.size) (i32.const 16)))
        (then
          (if (i32.eq
                (memory.grow
                  (i32.add
                    (i32.shr_u
                      (i32.sub (global.get $next) (i32.shl (memory.size) (i32.const 16)))
                      (i32.const 16))
                    (i32.const 1)))
                (i32.const -1))
            (then unreachable))))
      (local.get $at))

    ;; result<_, string> at address 16: discriminant 0 (ok), memory starts zeroed.
    (func (export "init") (param i32 i32) (result i32)
      (i32.const 16))

    ;; Grows both memories by 768 pages (48 MiB) each, then returns `keep` for every event:
    ;; a list of `len` outcomes (12 bytes each, discriminant 0 = keep) in the fresh zero pages.
    (func (export "process") (param $events i32) (param $len i32) (result i32)
      (local $old_pages i32)
      (if (i32.eq (call $grow_second (i32.const 768)) (i32.const -1))
        (then unreachable))
      (local.set $old_pages (memory.grow (i32.const 768)))
      (if (i32.eq (local.get $old_pages) (i32.const -1))
        (then unreachable))
      (i32.store (i32.const 32) (i32.shl (local.get $old_pages) (i32.const 16)))
      (i32.store (i32.const 36) (local.get $len))
      (i32.const 32)))

  (core instance $second_instance (instantiate $second))
  (core instance $m (instantiate $main (with "second" (instance $second_instance))))

  (type $fields_t (record
    (field "event-source" (option string))
    (field "event-name" (option string))
    (field "event-type" (option string))
    (field "source-ip-address" (option string))
    (field "account" (option string))
    (field "region" (option string))
    (field "country" (option string))
    (field "read-only" (option bool))))
  (export $fields "fields" (type $fields_t))
  (type $event_t (record (field "json" (list u8)) (field "fields" $fields)))
  (export $event "event" (type $event_t))
  (type $member_t (record (field "key" string) (field "value" string)))
  (export $member "member" (type $member_t))
  (type $outcome_t (variant
    (case "keep")
    (case "annotate" (list $member))
    (case "replace" (list u8))
    (case "split" (list (list u8)))
    (case "drop")
    (case "failed" string)))
  (export $outcome "outcome" (type $outcome_t))

  (func $init (param "config" (list (tuple string string))) (result (result (error string)))
    (canon lift (core func $m "init") (memory $m "memory") (realloc (func $m "realloc"))))
  (func $process (param "events" (list $event)) (result (list $outcome))
    (canon lift (core func $m "process") (memory $m "memory") (realloc (func $m "realloc"))))
  (export "init" (func $init))
  (export "process" (func $process)))
