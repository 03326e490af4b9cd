// A test SMSC on 127.0.0.1: checks bind credentials, records every submit_sm as one JSON line on
// stdout, and refuses two magic destinations (throttled, invalid). Usage: node server.js PORT SYSTEM_ID PASSWORD
// Its first line is {"event":"listening","port":N}.
'use strict';
const smpp = require('smpp');

const [port, systemId, password] = [Number(process.argv[2] || 0), process.argv[3], process.argv[4]];
const THROTTLED_NUMBER = '4915550000058';
const INVALID_NUMBER = '4915550000011';
let nextId = 1;

function emit(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

const server = smpp.createServer(function (session) {
  let bound = false;
  function bind(pdu) {
    if (pdu.system_id !== systemId || pdu.password !== password) {
      emit({ event: 'bind_refused', command: pdu.command, system_id: pdu.system_id });
      session.send(pdu.response({ command_status: smpp.ESME_RBINDFAIL }));
      session.close();
      return;
    }
    bound = true;
    emit({ event: 'bound', command: pdu.command, system_id: pdu.system_id });
    session.send(pdu.response({ system_id: 'TESTSMSC' }));
  }
  session.on('bind_transmitter', bind);
  session.on('bind_transceiver', bind);
  session.on('enquire_link', function (pdu) {
    emit({ event: 'enquire_link' });
    session.send(pdu.response());
  });
  session.on('unbind', function (pdu) {
    emit({ event: 'unbind' });
    session.send(pdu.response());
    session.close();
  });
  session.on('submit_sm', function (pdu) {
    if (!bound) {
      session.send(pdu.response({ command_status: smpp.ESME_RINVBNDSTS }));
      return;
    }
    const message = pdu.short_message || {};
    const record = {
      event: 'submit_sm',
      source_addr: pdu.source_addr,
      source_addr_ton: pdu.source_addr_ton,
      destination_addr: pdu.destination_addr,
      dest_addr_ton: pdu.dest_addr_ton,
      data_coding: pdu.data_coding,
      esm_class: pdu.esm_class,
      registered_delivery: pdu.registered_delivery,
      udh: (message.udh || []).map((b) => b.toString('hex')),
      message: typeof message.message === 'string' ? message.message : null,
    };
    if (pdu.destination_addr === THROTTLED_NUMBER) {
      record.answer = 'ESME_RTHROTTLED';
      emit(record);
      session.send(pdu.response({ command_status: smpp.ESME_RTHROTTLED }));
      return;
    }
    if (pdu.destination_addr === INVALID_NUMBER) {
      record.answer = 'ESME_RINVDSTADR';
      emit(record);
      session.send(pdu.response({ command_status: smpp.ESME_RINVDSTADR }));
      return;
    }
    const messageId = 'msg' + nextId++;
    record.message_id = messageId;
    emit(record);
    session.send(pdu.response({ message_id: messageId }));
    if (pdu.registered_delivery) {
      session.deliver_sm({
        source_addr: pdu.destination_addr,
        destination_addr: pdu.source_addr,
        esm_class: smpp.ESM_CLASS.MC_DELIVERY_RECEIPT,
        short_message: 'id:' + messageId + ' sub:001 dlvrd:001 stat:DELIVRD err:000 text:',
        receipted_message_id: messageId,
      });
    }
  });
  session.on('error', function () { /* a client that vanishes is not our problem */ });
});

server.listen(port, '127.0.0.1', function () {
  emit({ event: 'listening', port: server.address().port });
});

process.on('SIGTERM', function () {
  server.close();
  process.exit(0);
});
